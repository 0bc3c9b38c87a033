import os

from kwbackup import run
from kwbackup.places import Place

HOSTILE = ["a b", "it's", "$(touch /tmp/kw-pwned)", "`id`", "x; rm -rf /", "new\nline", "*", "-rf", "ż"]


def test_remote_commands_reach_the_place_verbatim(ssh_world):
    prod = Place("prod", "prod", "/var/backups/kw-app", 2, str(ssh_world.config))
    _, out, _ = run.run(prod.command(["printf", "%s\\0", *HOSTILE]))
    assert out.decode().split("\0")[:-1] == HOSTILE
    assert not os.path.exists("/tmp/kw-pwned")


def test_ssh_is_batch_mode_and_reports_an_unreachable_place(ssh_world):
    gone = Place("nas", "user@127.0.0.9", "/backups", 3, str(ssh_world.config))
    cmd = gone.command(["true"])
    assert "BatchMode=yes" in cmd.argv and "-F" in cmd.argv
    code, _, err = run.run(cmd, check=False, timeout=30)
    assert code == 255 and "127.0.0.9" in err


def test_local_place_runs_commands_here_and_expands_home():
    here = Place("pi5", "local", "~/backups", 3)
    assert here.command(["true"]).argv == ["true"]
    assert str(here.local_dir()).endswith("/backups") and not str(here.local_dir()).startswith("~")
    assert Place("old-prod", "deploy@old", "~/baza_dump/sql", None).remote_path("x.sql") == "baza_dump/sql/x.sql"


def test_label_is_the_contracts_heading():
    assert (
        Place("prod", "ubuntu@146.59.44.70", "/var/backups/kw-app", 2).label
        == "Production Server (146.59.44.70:/var/backups/kw-app/)"
    )
