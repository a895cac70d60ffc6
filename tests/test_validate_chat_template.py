"""`harness validate` renders a system + user probe when data.system_prompt is set: a chat
template without a system role (Gemma-2's raises on one) is an error before any compute,
not a crash at the run's first generation."""

from __future__ import annotations

from test_eval_fixtures import hub_cache  # noqa: F401  (the fixture)
from test_validate import errors_of, run_validate, spin, world  # noqa: F401  (world: the fixture)

NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}"
             "{{ raise_exception('System role not supported') }}{% endif %}"
             "<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def _experiment(w, tiny_dir, system_prompt: str) -> str:
    (w / "no_system.jinja").write_text(NO_SYSTEM)
    text = spin(w, tiny_dir).replace('device = "cpu"', f'device = "cpu"\nchat_template = "{w}/no_system.jinja"')
    return text.replace("[data]\n", f'[data]\nsystem_prompt = "{system_prompt}"\n') if system_prompt else text


def test_a_template_without_a_system_role_and_a_system_prompt_is_an_error(world, tiny_dir, capsys):
    code, path, err = run_validate(world, _experiment(world, tiny_dir, "You are helpful."), capsys)
    assert code == 1
    found = errors_of(err, path)
    assert "data.system_prompt" in found, err
    assert "cannot render a system message" in found["data.system_prompt"]
    assert "System role not supported" in found["data.system_prompt"]
    assert "no_system.jinja" in found["data.system_prompt"]


def test_the_same_template_without_a_system_prompt_passes(world, tiny_dir, capsys):
    code, path, err = run_validate(world, _experiment(world, tiny_dir, ""), capsys)
    assert code == 0, err


def cached_hub_model(hub, tiny_dir, repo: str, tokenizer: bool = True) -> None:
    """``tiny_dir``'s config (and, with ``tokenizer``, its tokenizer with the NO_SYSTEM template) as
    hub model ``repo`` in the Hugging Face hub cache ``hub``, in the hub's layout."""
    import json

    rev = "1" * 40
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((tiny_dir / "config.json").read_text())
    if tokenizer:
        (snap / "tokenizer.json").write_text((tiny_dir / "tokenizer.json").read_text())
        tc = json.loads((tiny_dir / "tokenizer_config.json").read_text())
        (snap / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": NO_SYSTEM}))


def test_a_cached_hub_tokenizer_without_a_system_role_is_an_error_offline(world, tiny_dir, hub_cache, capsys):
    cached_hub_model(hub_cache, tiny_dir, "org/no-system")
    text = spin(world, "org/no-system").replace("[data]\n", '[data]\nsystem_prompt = "You are helpful."\n')
    code, path, err = run_validate(world, text, capsys)
    assert code == 1
    found = errors_of(err, path)
    assert "data.system_prompt" in found, err
    assert "the chat template of 'org/no-system' cannot render a system message" in found["data.system_prompt"]
    assert "System role not supported" in found["data.system_prompt"]


def test_a_hub_tokenizer_missing_from_the_cache_is_not_checked_offline(world, tiny_dir, hub_cache, capsys):
    cached_hub_model(hub_cache, tiny_dir, "org/config-only", tokenizer=False)
    text = spin(world, "org/config-only").replace("[data]\n", '[data]\nsystem_prompt = "You are helpful."\n')
    code, path, err = run_validate(world, text, capsys)
    assert code == 0, err
