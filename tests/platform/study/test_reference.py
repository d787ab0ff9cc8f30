"""docs/config.md is what the code generates (`ercstudy config --reference`), and says something of every field."""

from pathlib import Path

from ercstudy.platform.cli import main
from ercstudy.platform.study.reference import field_comments, reference
from ercstudy.platform.study.spec import SearchConfig
from ercstudy.trainables.config import TrainConfig

PAGE = Path(__file__).resolve().parents[3] / "docs" / "config.md"


def test_the_committed_reference_is_what_the_code_generates(capsys):
    assert main(["config", "--reference"]) == 0
    printed = capsys.readouterr().out
    assert printed == reference()
    assert PAGE.read_text() == printed, "docs/config.md is stale: run `ercstudy config --reference > docs/config.md`"


def test_every_field_has_a_meaning_and_comments_are_read_from_the_code():
    rows = [line for line in reference().splitlines() if line.startswith("| `")]
    assert len(rows) > 80 and not [r for r in rows if r.endswith("|  |")]
    assert field_comments(SearchConfig)["repeats"].startswith("each point runs at `repeats` seeds")  # lines above a field
    assert "learning rate" in field_comments(TrainConfig)["lr"]  # the comment on its line
