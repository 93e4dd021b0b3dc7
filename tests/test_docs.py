"""The docs list every CLI option and config key (they are generated from the code)."""
from mmfusion import docgen
from mmfusion.cli import build_parser
from mmfusion.config import default_config


def test_usage_doc_is_up_to_date():
    assert docgen.USAGE_MD.read_text() == docgen.usage_markdown(), "run: python -m mmfusion.docgen"


def test_config_doc_is_up_to_date():
    assert docgen.CONFIG_MD.read_text() == docgen.config_markdown(), "run: python -m mmfusion.docgen"


def test_every_option_and_key_is_documented():
    usage = docgen.USAGE_MD.read_text()
    for action in build_parser()._actions:
        for opt in action.option_strings or [action.dest]:
            assert opt in usage, opt
    config = docgen.CONFIG_MD.read_text()
    for section, keys in default_config().items():
        for key in keys:
            assert f"`{section}.{key}`" in config, f"{section}.{key}"
