"""One orchestrator per level: template, participant, group."""
