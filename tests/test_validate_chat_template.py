"""`harness validate` renders a system + user probe when data.system_prompt is set: a chat
template without a system role (Gemma-2's raises on one) is an error before any compute,
not a crash at the run's first generation."""

from __future__ import annotations

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
