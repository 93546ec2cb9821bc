"""Review 27 (revjobs): ``python -m examples.nanogpt train`` without ``--steps``/``--tokens`` (or with an unknown
variant or profile) said ``python -m examples.nanogpt: error: train: give --steps ...``, a doubled prefix, while
its argparse errors and its other lines say ``python -m examples.nanogpt train: ...``."""
import pytest

from examples.nanogpt.__main__ import main

PREFIX = "python -m examples.nanogpt train: error: "


@pytest.mark.parametrize("argv, said", [
    (["train"], "give --steps or --tokens"),
    (["train", "--steps", "1", "--variant", "NoSuchVariant"], "NoSuchVariant"),
    (["train", "--steps", "1", "--profile", "huge"], "huge"),
    (["train", "--steps", "x"], "--steps"),  # argparse's own (the train parser's prefix already)
])
def test_every_train_error_has_the_train_prefix(argv, said, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and err.startswith(PREFIX) and said in err, err
    assert "train: error: train:" not in err and not err.startswith("python -m examples.nanogpt: error")
