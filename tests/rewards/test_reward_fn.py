"""load_reward_fn: 'module:function' specs and their error messages."""
import textwrap

import pytest

from scope_megatron.rewards import DEFAULT_REWARD_FN, boxed_match, load_reward_fn

MODULE = textwrap.dedent('''
    def score(response_text, reference, *, metadata):
        return float(response_text.strip() == reference)

    def two_args(response_text, reference):
        return 1.0

    class Grader:
        @staticmethod
        def grade(response_text, reference, *, metadata, strict=False):
            return 0.5

    NOT_CALLABLE = 3
''')


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(MODULE)
    (tmp_path / "broken_rewards.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "raising_rewards.py").write_text("raise RuntimeError('bad config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_default_is_the_boxed_verifier():
    assert load_reward_fn() is boxed_match
    assert load_reward_fn(DEFAULT_REWARD_FN) is boxed_match


def test_loads_functions_and_dotted_attributes(reward_module):
    fn = load_reward_fn(f"{reward_module}:score")
    assert fn(" 5", "5", metadata={"finished": True}) == 1.0
    assert load_reward_fn(f"{reward_module}:Grader.grade")("", "", metadata={}) == 0.5


@pytest.mark.parametrize("spec, error, message", [
    ("my_rewards.score", ValueError, "module:function"),
    ("my_rewards:", ValueError, "module:function"),
    (":score", ValueError, "module:function"),
    ("a:b:c", ValueError, "module:function"),
    ("no_such_module_xyz:score", ImportError, "module 'no_such_module_xyz' not found"),
    ("my_rewards.sub:score", ImportError, "not found"),
    ("broken_rewards:score", ImportError, "importing 'broken_rewards' failed.*no_such_dependency"),
    ("raising_rewards:score", ImportError, "RuntimeError: bad config"),
    ("my_rewards:missing", AttributeError, "no attribute 'missing'"),
    ("my_rewards:Grader.missing", AttributeError, "missing 'missing'"),
    ("my_rewards:NOT_CALLABLE", TypeError, "not a callable"),
    ("my_rewards:two_args", TypeError, r"reward_fn\(response_text, reference, \*, metadata\)"),
])
def test_bad_specs_name_the_problem(reward_module, spec, error, message):
    with pytest.raises(error, match=message):
        load_reward_fn(spec)
