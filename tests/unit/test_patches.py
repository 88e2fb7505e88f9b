"""Patches to Megatron-LM (``patches/``): every patch names its upstream commit, what it changes and why no
hook allows it; with no patch, ``patches/README.md`` says so, why, and against which commit."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PATCHES = ROOT / "patches"
REQUIRED = ("Upstream-Commit", "Changes", "Why-No-Hook")
COMMIT = re.compile(r"\b[0-9a-f]{40}\b")


def parse_header(text: str) -> dict:
    """``# Key: value`` lines before the first ``diff --git``; raises if the patch has no diff."""
    header, _, diff = text.partition("diff --git ")
    if not diff:
        raise ValueError("no 'diff --git' section: not a git patch")
    fields = {}
    for line in header.splitlines():
        match = re.match(r"#\s*([A-Za-z-]+):\s*(.*\S)\s*$", line)
        if match:
            fields[match.group(1)] = match.group(2)
    return fields


def header_problems(text: str) -> list[str]:
    try:
        fields = parse_header(text)
    except ValueError as error:
        return [str(error)]
    problems = [f"missing '# {key}: ...'" for key in REQUIRED if key not in fields]
    commit = fields.get("Upstream-Commit", "")
    if commit and not COMMIT.fullmatch(commit):
        problems.append(f"Upstream-Commit ({commit}) must be a full 40-hex Megatron-LM commit")
    return problems


def verified_commit() -> str:
    """The Megatron-LM commit docs/megatron_lm.md says the integration was verified against."""
    text = (ROOT / "docs" / "megatron_lm.md").read_text()
    line = next(line for line in text.splitlines() if "Verified against" in line)
    return COMMIT.search(line).group(0)


GOOD = f"""# Upstream-Commit: {'a' * 40}
# Changes: megatron/training/training.py: call a hook after model build
# Why-No-Hook: nothing runs between model build and train()
diff --git a/megatron/training/training.py b/megatron/training/training.py
"""


@pytest.mark.parametrize("text,problems", [
    (GOOD, []),
    (GOOD.replace("a" * 40, "abc123"), ["Upstream-Commit (abc123) must be a full 40-hex Megatron-LM commit"]),
    (GOOD.replace("# Why-No-Hook: nothing runs between model build and train()\n", ""),
     ["missing '# Why-No-Hook: ...'"]),
    (GOOD.split("diff --git")[0], ["no 'diff --git' section: not a git patch"]),
])
def test_header_check_reports_each_problem(text, problems):
    assert header_problems(text) == problems


def test_every_patch_has_its_header_or_readme_says_none_is_needed():
    patches = sorted(PATCHES.glob("*.patch"))
    readme = (PATCHES / "README.md").read_text()
    if patches:
        problems = {p.name: header_problems(p.read_text()) for p in patches}
        assert not any(problems.values()), problems
        for patch in patches:
            assert patch.name in readme, f"patches/README.md must list {patch.name}"
            assert parse_header(patch.read_text())["Upstream-Commit"] == verified_commit()
        return
    # No patch: the README must say so, give the reason (the hooks) and the commit it was checked against.
    assert "No patch is needed" in readme
    for hook in ("extra_args_provider", "transformer_layer_spec", "post_wrap_hooks", "finalize_model_grads_func"):
        assert hook in readme, f"patches/README.md should name the hook {hook}"
    assert verified_commit() in readme, "patches/README.md and docs/megatron_lm.md name different commits"
