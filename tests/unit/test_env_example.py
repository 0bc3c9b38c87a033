from dotenv import dotenv_values

from kwbackup import settings
from tests.world import ROOT


def test_env_example_lists_every_setting_with_a_comment():
    text = (ROOT / ".env.example").read_text().splitlines()
    for setting in settings.SETTINGS:
        lines = [i for i, line in enumerate(text) if line.lstrip("#").startswith(setting.name + "=")]
        assert lines, f"{setting.name} missing from .env.example"
        assert text[lines[0] - 1].startswith("# "), f"{setting.name} has no comment above it"


def test_env_example_loads_and_validates():
    values = dotenv_values(ROOT / ".env.example")
    loaded = settings.load(environ={"KW_BACKUP_ENV": str(ROOT / ".env.example")})
    for name, value in values.items():
        if value:
            assert loaded[name] == value
