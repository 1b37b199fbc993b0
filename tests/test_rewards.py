"""Reward functions: the rules shipped with align, plug-ins and their errors, the reward model on a shared base."""

import math
import time

import pytest
import torch
from conftest import TINY_BASE
from peft import LoraConfig, PeftModel, get_peft_model

from align.modeling import load_model
from align.recipe import ModelConfig, RewardFunction
from align.rewards import (
    RewardError,
    RewardFailed,
    SharedBaseRewardModel,
    exact_match,
    format_match,
    length_penalty,
    reward_function,
    reward_model_scorer,
)

PROMPTS = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "What is 4 + 4?"}]]
COMPLETIONS = [[{"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}],
               [{"role": "assistant", "content": "4 + 4 = 9. The answer is 9."}]]


def call(spec: RewardFunction, **columns):
    return reward_function(spec)(PROMPTS, COMPLETIONS, completion_ids=[[1] * 10, [1] * 30], **columns)


def test_rule_rewards_score_what_they_say():
    assert exact_match(PROMPTS, COMPLETIONS, answer=["The answer is 5.", "The answer is 8."]) == [1.0, 0.0]
    assert format_match(PROMPTS, COMPLETIONS, pattern=r"The answer is \d+\.$") == [1.0, 1.0]
    assert format_match(PROMPTS, ["The answer: 5"], pattern=r"The answer is \d+\.$") == [0.0]
    assert length_penalty(PROMPTS, COMPLETIONS, completion_ids=[[1] * 10, [1] * 30], max_tokens=20) == [0.0, -0.1]
    spec = RewardFunction(name="exact_match", weight=2.0, args={"column": "reference"})
    assert call(spec, reference=["5", "8"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"exact_match: the prompt data has no column 'reference' .*columns: "
                                          r"answer\); set its args.column"):
        call(spec, answer=["5", "8"])


def test_rule_arguments_are_checked_against_the_rule():
    with pytest.raises(RewardError, match=r"reward 'format': args \['pattern'\] required; it takes args \{pattern\}"):
        reward_function(RewardFunction(name="format"))
    with pytest.raises(RewardError, match=r"reward 'length': unknown args \['max_token'\]; it takes args "
                                          r"\{max_tokens, per_token=0.01\}"):
        reward_function(RewardFunction(name="length", args={"max_token": 5}))
    with pytest.raises(RewardError, match=r"reward 'exact': not a reward shipped with align .* nor a plug-in"):
        reward_function(RewardFunction(name="exact"))


PLUGIN = '''
import math
import time
CALLS = []

def digits(prompts, completions, **kwargs):
    CALLS.append({"prompts": prompts, "completions": completions, **kwargs})
    return [float(sum(ch.isdigit() for ch in c[0]["content"])) for c in completions]

def short(prompts, completions, **kwargs):
    return [1.0]

def nan(prompts, completions, **kwargs):
    return [math.nan] * len(completions)

def words(prompts, completions, **kwargs):
    return ["good"] * len(completions)

def fewer_args(completions):
    return [0.0] * len(completions)

def hangs(prompts, completions, **kwargs):
    time.sleep(600)

def breaks(prompts, completions, **kwargs):
    return [1 / 0 for _ in completions]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    import sys

    sys.modules.pop("my_rewards", None)


def test_plugin_is_called_with_prompts_completions_and_columns(plugin):
    import my_rewards

    fn = reward_function(RewardFunction(name=f"{plugin}:digits", weight=0.5, args={"scale": 1}))
    assert fn.__name__ == "digits" and fn.weight == 0.5
    assert fn(PROMPTS, COMPLETIONS, completion_ids=[[1], [2]], answer=["5", "8"]) == [4.0, 4.0]
    call = my_rewards.CALLS[-1]
    assert call["prompts"] == PROMPTS and call["completions"] == COMPLETIONS
    assert call["answer"] == ["5", "8"] and call["completion_ids"] == [[1], [2]] and call["scale"] == 1


@pytest.mark.parametrize("name, error", [
    ("no_such_module:fn", r"reward plug-in 'no_such_module:fn': cannot import module 'no_such_module' "
                          r"\(ModuleNotFoundError.*PYTHONPATH"),
    ("my_rewards:missing", r"reward plug-in 'my_rewards:missing': module 'my_rewards' .* has no 'missing'"),
    ("my_rewards:NOT_A_FUNCTION", r"'NOT_A_FUNCTION' is a int, not a function"),
    ("my_rewards:fewer_args", r"signature fewer_args\(completions\) does not take TRL's reward arguments; define it "
                              r"as def fewer_args\(prompts, completions, \*\*kwargs\)"),
])
def test_bad_plugin_spec_is_an_error_naming_the_plugin(plugin, name, error):
    with pytest.raises(RewardError, match=error):
        reward_function(RewardFunction(name=name))


@pytest.mark.parametrize("name, error", [
    ("short", r"reward 'short' returned 1 values for 2 completions; return one per completion"),
    ("nan", r"reward 'nan' returned nan for completion 0 \('2 \+ 3 = 5.*'\); return a finite number"),
    ("words", r"reward 'words' returned 'good' for completion 0"),
])
def test_bad_plugin_output_is_an_error_naming_the_plugin(plugin, name, error):
    fn = reward_function(RewardFunction(name=f"{plugin}:{name}"))
    with pytest.raises(RewardError, match=error):
        fn(PROMPTS, COMPLETIONS)


def test_a_plugin_that_hangs_stops_after_its_timeout_naming_it_and_where_it_waits(plugin):
    fn = reward_function(RewardFunction(name=f"{plugin}:hangs", timeout_s=0.5))
    started = time.monotonic()
    with pytest.raises(RewardFailed, match=r"reward 'hangs' \(.*my_rewards.py:\d+\) did not return within "
                       r"timeout_s=0.5 s for 2 completions") as raised:
        fn(PROMPTS, COMPLETIONS)
    assert time.monotonic() - started < 5
    assert "time.sleep(600)" in raised.value.details


def test_a_plugin_that_raises_is_one_line_naming_the_file_and_line(plugin):
    fn = reward_function(RewardFunction(name=f"{plugin}:breaks"))
    with pytest.raises(RewardFailed, match=r"^reward 'breaks' raised ZeroDivisionError: division by zero \(at "
                       r".*my_rewards.py:\d+\)$") as raised:
        fn(PROMPTS, COMPLETIONS)
    assert "Traceback" in raised.value.details and "1 / 0" in raised.value.details


def test_none_means_not_applicable_and_passes(plugin, tmp_path):
    (tmp_path / "my_rewards.py").write_text(PLUGIN + "\ndef partial(prompts, completions, **kw):\n"
                                            "    return [None, 1]\n")
    fn = reward_function(RewardFunction(name=f"{plugin}:partial"))
    assert fn(PROMPTS, COMPLETIONS) == [None, 1.0]


def test_reward_model_on_the_policy_base_scores_as_on_its_own(reward_checkpoint):
    cfg = ModelConfig(name_or_path=str(TINY_BASE))  # 4-bit NF4 on CPU, as in the stages
    policy = get_peft_model(load_model(cfg), LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    probe = torch.tensor([[5, 6, 7, 8]])
    policy_logits = policy(input_ids=probe).logits
    shared = reward_model_scorer(reward_checkpoint, cfg, policy=policy)
    own = reward_model_scorer(reward_checkpoint, cfg, policy=None)
    assert isinstance(shared.model, SharedBaseRewardModel) and isinstance(own.model, PeftModel)
    prompts = ["What is 2 + 3?", "What is 40 + 2?", "Hi"]
    completions = ["2 + 3 = 5. The answer is 5.", "42", "Hello there, how are you today?"]
    a, b = shared.score(prompts, completions), own.score(prompts, completions)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4)
    assert len(set(a)) == 3 and not any(math.isnan(x) for x in a)
    # The policy is as it was: its adapter active, only its adapter trainable, the same outputs, train mode.
    assert policy.active_adapter == "default" and policy.training
    assert {n.split(".")[-2] for n, p in policy.named_parameters() if p.requires_grad} == {"default"}
    torch.testing.assert_close(policy(input_ids=probe).logits, policy_logits)
    not_shared = reward_model_scorer(reward_checkpoint, cfg, policy=policy, share_base=False)
    assert isinstance(not_shared.model, PeftModel)
    other = ModelConfig(name_or_path="some/other-model")
    with pytest.raises(RewardError, match=r"args.share_base=true, but .* was trained on .*tiny-base, not the "
                                          r"policy's base some/other-model"):
        reward_model_scorer(reward_checkpoint, other, policy=policy, share_base=True)
