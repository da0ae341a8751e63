"""experiments/first_contact.py's classification, on synthetic outcomes: one test per outcome, no subprocess."""
import pytest

from experiments import first_contact as F

REFUSE = F.C("x", "paths", "a refusal", ["train.py"], words=["--data-path", "a file"])
SUCCEED = F.C("y", "odd", "a success", ["train.py"], expect="succeed")
SIGTERM = F.C("z", "misleading", "stopped", ["train.py"], expect="succeed", rc=143)
MESSAGE = F.C("w", "first", "a message", ["train.py"], expect="succeed", on_check_fail="misleading")
SAME = {"imgs/a.png": "ab12"}
LINE = "error: --data-path x.png is a file, not a folder; pass the folder of class folders\n"


def test_lost_wins_over_everything():
    assert F.classify(REFUSE, 1, LINE, SAME, {"imgs/a.png": None}) == "lost"
    assert F.classify(SUCCEED, 0, "", SAME, {}) == "lost"  # a vanished file
    assert F.classify(REFUSE, 1, LINE, SAME, dict(SAME)) == "clear"
    assert F.classify(REFUSE, 1, LINE, SAME, dict(SAME, **{"imgs/b.png": "cd34"})) == "clear"  # a new file: no loss


def test_traceback():
    err = "Traceback (most recent call last):\n  File \"train.py\", line 1\nFileNotFoundError: x\n"
    assert F.classify(REFUSE, 1, err, SAME, SAME) == "traceback"
    assert F.classify(SUCCEED, 1, err, SAME, SAME) == "traceback"


def test_silent():
    assert F.classify(REFUSE, 0, "", SAME, SAME) == "silent"  # a refusal due, exit 0
    assert F.classify(SUCCEED, 0, "", SAME, SAME, check_ok=False) == "silent"  # a wrong result
    assert F.classify(SIGTERM, 0, "", SAME, SAME) == "silent"  # 143 due, 0 given
    assert F.classify(SUCCEED, 0, "", SAME, SAME) == "handled"


def test_misleading():
    assert F.classify(REFUSE, 1, "error: --data-path x.png does not exist\n", SAME, SAME) == "misleading"
    assert F.classify(REFUSE, 1, "warning: slow\n" + LINE, SAME, SAME) == "misleading"  # two lines
    assert F.classify(REFUSE, 1, LINE.replace("error: ", ""), SAME, SAME) == "misleading"  # not an error: line
    assert F.classify(MESSAGE, 0, "", SAME, SAME, check_ok=False) == "misleading"  # a wrong message on success
    rejecting = dict(REFUSE, reject=r"cut")
    assert F.classify(rejecting, 1, LINE.replace("pass", "cut"), SAME, SAME) == "misleading"


def test_clear_ignores_progress_bars_and_case():
    bar = "  50%|#####     | 1/2 [00:01<00:01]\r100%|##########| 2/2 [00:02<00:00]\n"
    assert F.classify(REFUSE, 1, bar + LINE.replace("--data-path", "--DATA-PATH"), SAME, SAME) == "clear"
    assert F.classify(REFUSE, 2, LINE, SAME, SAME) == "clear"


def test_handled():
    assert F.classify(SUCCEED, 0, "some progress\n", SAME, SAME, check_ok=True) == "handled"
    assert F.classify(SIGTERM, 143, "stopped by SIGTERM: continue with --resume\n", SAME, SAME) == "handled"
    assert F.classify(SIGTERM, 143, "", SAME, SAME, check_ok=False) == "silent"


def test_failed():
    assert F.classify(SUCCEED, 1, "error: cannot read x.png\n", SAME, SAME) == "failed"
    assert F.classify(SIGTERM, -15, "", SAME, SAME) == "failed"  # killed by the signal, not stopped by it


def test_timeout():
    assert F.classify(SUCCEED, None, "", SAME, {}) == "timeout"


def test_the_catalogue_is_well_formed():
    ids = [c["id"] for c in F.CASES]
    assert len(ids) == len(set(ids)) >= 45
    for c in F.CASES:
        assert c["cls"] in F.ISSUE_CLASSES and c["expect"] in ("refuse", "succeed")
        assert c["argv"][0] in ("train.py", "sample.py", "prepare.py", "fid.py"), c["id"]
        assert c["expect"] == "succeed" or c["words"], c["id"]  # a refusal says what its line must name
        assert c["words"] == [w.lower() for w in c["words"]]


@pytest.mark.parametrize("text,lines", [("a\r b\n\n c \n", ["b", "c"]), ("\x1b[A 10%|# | 1/9\n", [])])
def test_visible_lines(text, lines):
    assert F.visible_lines(text) == lines
