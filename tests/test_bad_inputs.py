"""Bad input at the public entry points of course_lib gets a clear error: the right exception type and a
message that names the argument and what would be right (issue 14, reliability pass).

One table: each row is the call, the exception it must raise, and a regex its message must match.
The calls share the embedded model; anything a call would change is a deep copy.
"""

import contextlib
import copy
import io
import random

import pytest
import torch
from torch import nn

from course_lib import (adapters, bench, data, dpo, grpo, ia3, lab, lora, models, nf4, ppo, reward_model, rl, sft,
                        soft_prompts, templates, training)


class CLIError(Exception):
    """A CLI's main() returned non-zero (or argparse exited): the message is what it printed to stderr."""


def cli(main, argv: list[str]) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    if rc:
        raise CLIError(f"rc={rc}: {err.getvalue()}")


@pytest.fixture(scope="module")
def ctx(embedded, tmp_path_factory):
    """What the rows need: the embedded (model, tokenizer), a scratch folder, a saved LoRA and IA3 adapter."""
    model, tok = embedded
    tmp = tmp_path_factory.mktemp("bad_inputs")
    with_lora = copy.deepcopy(model)
    lora.add_lora(with_lora, ["q_proj"], r=2)
    lora.save_adapter(with_lora, tmp / "lora")
    with_ia3 = copy.deepcopy(model)
    ia3.add_ia3(with_ia3, ["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    ia3.save_adapter(with_ia3, tmp / "ia3")
    (tmp / "not_json.jsonl").write_text("{bad\n")
    (tmp / "no_prompt.jsonl").write_text('{"a": 1}\n')
    (tmp / "empty_dir").mkdir()
    return {"model": model, "tok": tok, "tmp": tmp, "copy": lambda: copy.deepcopy(model)}


PAIR = {"prompt": "a", "chosen": "b", "rejected": "c"}
ONE_STEP = dict(steps=1, progress=False)


def _train(c, batches, config=None):
    return training.train(c["copy"](), batches, config if config is not None else training.TrainConfig(**ONE_STEP))


def _ids():
    return torch.tensor([[1, 2, 3]])


# (id, call(ctx), exception type, regex the message must match)
CASES = [
    # --- models.load_model
    ("load_model/no-folder", lambda c: models.load_model("./no/such/dir"),
     FileNotFoundError, r"no model folder at .*no/such/dir.*None loads the embedded model"),
    ("load_model/hub-offline", lambda c: models.load_model("someone/not-a-model"),
     OSError, r"cannot load 'someone/not-a-model'.*cannot be reached.*hf download someone/not-a-model.*pass None"),
    ("load_model/folder-without-config", lambda c: models.load_model(c["tmp"] / "empty_dir"),
     FileNotFoundError, r"empty_dir is a folder but holds no config\.json"),
    ("load_model/quantization", lambda c: models.load_model(None, quantization="int3"),
     ValueError, r"unknown quantization 'int3'; choose one of \(None, 'bnb-nf4'\)"),
    ("load_model/name-not-a-path", lambda c: models.load_model(123),
     TypeError, r"name_or_path must be a folder, a hub id \(str\) or None.*got int"),
    ("load_model/device-tpu", lambda c: models.load_model(None, device="tpu"),
     ValueError, r"device='tpu' is not a device PyTorch knows \(TPUs are reached through torch_xla.*pass 'cpu', 'cuda' "
                 r"or 'cuda:N'.*or None for the default"),
    ("load_model/device-malformed", lambda c: models.load_model(None, device="cuda:first"),
     ValueError, r"device='cuda:first' is not a device PyTorch knows: pass 'cpu', 'cuda' or 'cuda:N' \(N: the GPU's index\)"),
    ("load_model/device-not-a-string", lambda c: models.load_model(None, device=0),
     TypeError, r"device must be a string such as 'cpu' or 'cuda:0', a torch\.device, or None.*got int 0"),
    # "cuda" where this machine has no CUDA GPU; where it has some, one index past the last
    ("load_model/device-cuda-unavailable",
     lambda c: models.load_model(None, device=f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"),
     RuntimeError, r"device='cuda(:\d+)?', but (this PyTorch is built without CUDA|no CUDA GPU is visible|this machine has "
                   r"\d+ CUDA GPU).*pass (device='cpu'|one of those)"),
    # --- data
    ("data.load_jsonl/missing", lambda c: data.load_jsonl(c["tmp"] / "none.jsonl"),
     FileNotFoundError, r"dataset file .*none\.jsonl does not exist"),
    ("data.load_jsonl/not-json", lambda c: data.load_jsonl(c["tmp"] / "not_json.jsonl"),
     ValueError, r"not_json\.jsonl:1: not valid JSON.*each line must be one JSON object"),
    ("data.load_jsonl/missing-field",
     lambda c: data.load_jsonl(c["tmp"] / "no_prompt.jsonl", required=("prompt",)),
     ValueError, r"no_prompt\.jsonl:1: row is missing field\(s\) \['prompt'\]; it has \['a'\]"),
    ("data.preference_rows/task", lambda c: data.preference_rows("nope", "train", n=2, seed=0),
     ValueError, r"unknown preference task 'nope'; choose one of \['ending', 'concise'\]"),
    ("data.preference_rows/split", lambda c: data.preference_rows("concise", "test", n=2, seed=0),
     ValueError, r"split must be 'train' or 'heldout', got 'test'"),
    ("data.preference_rows/n", lambda c: data.preference_rows("concise", "train", n=0, seed=0),
     ValueError, r"n \(the number of rows\) must be a positive int, got 0"),
    ("data.check_preference_rows/missing", lambda c: data.check_preference_rows([{"prompt": "a", "chosen": "b"}]),
     ValueError, r"row 0: missing field\(s\) \['rejected'\]; preference rows need \['prompt', 'chosen', 'rejected'\]"),
    ("data.check_preference_rows/identical", lambda c: data.check_preference_rows([{"prompt": "a", "chosen": "b", "rejected": "b"}]),
     ValueError, r"row 0: chosen and rejected are identical.*drop the row"),
    ("data.sentiment_examples/split (hung before)", lambda c: data.sentiment_examples(2, 0, split="test"),
     ValueError, r"split must be 'train' or 'heldout', got 'test'"),
    ("data.split_of/percent-over-100", lambda c: data.split_of("story:x", heldout_percent=200),
     ValueError, r"heldout_percent=200 is a percentage of the items: give a number from 0 \(none held out\) to 100"),
    ("data.split_of/percent-negative", lambda c: data.split_of("story:x", heldout_percent=-5),
     ValueError, r"heldout_percent=-5 is a percentage of the items: give a number from 0"),
    ("data.split_of/percent-string", lambda c: data.split_of("story:x", heldout_percent="10"),
     TypeError, r"heldout_percent must be a number from 0 to 100, got str '10'"),
    ("data.split_of/key", lambda c: data.split_of(42),
     TypeError, r"key must be a string naming the item.*got int"),
    ("data.make_story/label (a sad story labelled 'angry' before)",
     lambda c: data.make_story(random.Random(0), label="angry"),
     ValueError, r"label='angry' is not a story label: give one of 'happy', 'sad', or None for a random one"),
    ("data.make_story/rng", lambda c: data.make_story(0, label="happy"),
     TypeError, r"rng must be a random\.Random \(e\.g\. random\.Random\(0\)\), got int"),
    # --- templates
    ("templates.task_rows/task", lambda c: templates.task_rows("nope", "train"),
     KeyError, r"unknown task 'nope'; tasks are \["),
    ("templates.task_rows/n", lambda c: templates.task_rows("colour", "train", n=0),
     ValueError, r"n \(rows per task\) must be a positive int or None, got 0"),
    ("templates.task_rows/split (hung before)", lambda c: templates.task_rows("sentiment", "test", n=2),
     ValueError, r"split must be 'train' or 'heldout', got 'test'"),
    ("templates.render_template/field", lambda c: templates.render_template("{question} {x}", {"question": "q"}),
     KeyError, r"template '\{question\} \{x\}' needs field\(s\) \['x'\]; the row has \['question'\]"),
    ("templates.instruction_dataset/templates", lambda c: templates.instruction_dataset(["colour"], templates="bogus"),
     ValueError, r"templates must be 'train' or 'heldout'.*got 'bogus'"),
    ("templates.instruction_dataset/task", lambda c: templates.instruction_dataset(["nope"]),
     ValueError, r"unknown task 'nope' in tasks; tasks are \["),
    ("templates.tokenize_prompt_and_completion/lengths",
     lambda c: templates.tokenize_prompt_and_completion(["a", "b"], ["c"], c["tok"]),
     ValueError, r"2 prompts but 1 completions"),
    ("templates.tokenize_prompt_and_completion/empty",
     lambda c: templates.tokenize_prompt_and_completion(["a"], [""], c["tok"]),
     ValueError, r"row 0: empty completion \(nothing to learn\); drop the row or fill it"),
    ("templates.tokenize_messages/not-dicts", lambda c: templates.tokenize_messages([["hi"]], c["tok"]),
     ValueError, r"row 0: a conversation is a list of \{'role', 'content'\} dicts"),
    ("templates.pack_examples/too-long",
     lambda c: templates.pack_examples([{"input_ids": [1] * 10, "labels": [1] * 10}], 4, 0),
     ValueError, r"example 0 has 10 tokens, over the packing length 4"),
    # --- sft
    ("sft.data_format/no-rows", lambda c: sft.data_format([]), ValueError, r"no rows to train on"),
    ("sft.data_format/missing-key", lambda c: sft.data_format([{"prompt": "a", "completion": "b"}, {"prompt": "a"}]),
     ValueError, r"row 1: missing field\(s\) \['completion'\] \(rows are in the 'prompt-completion' format"),
    ("sft.data_format/row-not-dict", lambda c: sft.data_format(["just a string"]),
     TypeError, r"row 0: a row is a dict .*got str"),
    ("sft.sft_batches/packing-without-max_length",
     lambda c: sft.sft_batches([{"prompt": "a", "completion": "b"}], c["tok"], 2, packing=True),
     ValueError, r"packing needs max_length"),
    # --- training
    ("TrainConfig/steps", lambda c: training.TrainConfig(steps=0),
     ValueError, r"steps must be positive, got 0"),
    ("TrainConfig/steps-float", lambda c: training.TrainConfig(steps=2.5),
     TypeError, r"steps must be an int.*got 2\.5"),
    ("TrainConfig/lr-negative", lambda c: training.TrainConfig(steps=1, lr=-1.0),
     ValueError, r"lr must be a positive number.*got -1\.0"),
    ("TrainConfig/lr-string", lambda c: training.TrainConfig(steps=1, lr="1e-3"),
     ValueError, r"lr must be a positive number.*got '1e-3'"),
    ("TrainConfig/grad_accum", lambda c: training.TrainConfig(steps=1, grad_accum=0),
     ValueError, r"grad_accum must be positive, got 0"),
    ("TrainConfig/warmup", lambda c: training.TrainConfig(steps=2, warmup_steps=5),
     ValueError, r"warmup_steps must be in \[0, steps=2\], got 5"),
    ("TrainConfig/optimizer", lambda c: training.TrainConfig(steps=1, optimizer="adam"),
     ValueError, r"optimizer must be 'adamw' or 'sgd', got 'adam'"),
    ("TrainConfig/schedule", lambda c: training.TrainConfig(steps=1, schedule="linear"),
     ValueError, r"schedule must be 'cosine' or 'constant', got 'linear'"),
    ("TrainConfig/max_grad_norm", lambda c: training.TrainConfig(steps=1, max_grad_norm=-1),
     ValueError, r"max_grad_norm must be positive, or None"),
    ("TrainConfig/betas", lambda c: training.TrainConfig(steps=1, betas=(1.5, 0.9)),
     ValueError, r"betas must be two numbers in \[0, 1\)"),
    ("TrainConfig/seed", lambda c: training.TrainConfig(steps=1, seed=None),
     TypeError, r"seed must be an int \(torch\.manual_seed's, at the start of train\(\)\), got None"),
    ("TrainConfig/min_lr_ratio", lambda c: training.TrainConfig(steps=1, min_lr_ratio=2),
     ValueError, r"min_lr_ratio must be in \[0, 1\]"),
    ("train/config-dict", lambda c: _train(c, [], {"steps": 1}),
     TypeError, r"config must be a TrainConfig .*got dict"),
    ("train/no-labels", lambda c: _train(c, [{"input_ids": _ids()}]),
     KeyError, r"default loss needs batch\['labels'\].*pass loss_fn"),
    ("train/frozen-model",
     lambda c: training.train(
         c["copy"]().requires_grad_(False), [{"input_ids": _ids(), "labels": _ids()}],
         training.TrainConfig(**ONE_STEP)),
     ValueError, r"no trainable parameters: unfreeze some, or add an adapter first"),
    ("train/batches-run-out", lambda c: _train(c, []),
     ValueError, r"batches ran out after 0 micro-batch\(es\).*need 1: pass more batches, fewer steps"),
    ("train/batch-not-dict", lambda c: _train(c, [[1, 2, 3]]),
     TypeError, r"batch 0 is a list; a batch is a dict of tensors"),
    # --- nf4
    ("nf4.quantize_nf4/blocksize", lambda c: nf4.quantize_nf4(torch.randn(64), blocksize=48),
     ValueError, r"blocksize must be a power of two ≥ 2.*got 48"),
    ("nf4.quantize_nf4/int-tensor", lambda c: nf4.quantize_nf4(torch.arange(64)),
     TypeError, r"NF4 quantizes float tensors .*got torch\.int64"),
    ("nf4.quantize_nf4/list", lambda c: nf4.quantize_nf4([1.0] * 64),
     TypeError, r"NF4 quantizes float tensors .*got list"),
    ("nf4.quantize_nf4/empty", lambda c: nf4.quantize_nf4(torch.empty(0)),
     ValueError, r"cannot quantize an empty tensor"),
    ("nf4.quantize_nf4/nan", lambda c: nf4.quantize_nf4(torch.full((64,), float("nan"))),
     ValueError, r"holds 64 NaN/inf value\(s\).*fix the weights first"),
    ("nf4.dequantize_nf4/no-state",
     lambda c: nf4.dequantize_nf4(nf4.quantize_nf4(torch.randn(64))[0], None),
     TypeError, r"dequantize_nf4 needs the NF4State that quantize_nf4 returned"),
    ("nf4.dequantize_nf4/shape",
     lambda c: nf4.dequantize_nf4(torch.zeros(10, dtype=torch.uint8),
                                                               nf4.quantize_nf4(torch.randn(128))[1]),
     ValueError, r"packed tensor does not match its state: 10 bytes .*for 128 values \(expected 64 uint8\)"),
    ("nf4.quantize_blockwise_8bit/blocksize 0 (ZeroDivisionError before)",
     lambda c: nf4.quantize_blockwise_8bit(torch.randn(64), blocksize=0),
     ValueError, r"blocksize must be a power of two ≥ 2.*got 0"),
    ("nf4.NF4Linear/not-linear", lambda c: nf4.NF4Linear(nn.Conv1d(2, 2, 1)),
     TypeError, r"NF4Linear quantizes an nn\.Linear, got Conv1d"),
    ("nf4.quantize_model/no-linear", lambda c: nf4.quantize_model(nn.Sequential(nn.ReLU())),
     ValueError, r"the model has no nn\.Linear layers to quantize"),
    # --- ia3
    ("ia3.add_ia3/targets", lambda c: ia3.add_ia3(c["copy"](), ["nope"]),
     ValueError, r"target module\(s\) \['nope'\] match no nn\.Linear.*linear layer names are \[.*'q_proj'"),
    ("ia3.add_ia3/targets-int (\"'int' object is not iterable\" before)", lambda c: ia3.add_ia3(c["copy"](), 5),
     TypeError, r"target_modules must be a module name, a list of names .*or 'all-linear', got 5"),
    ("ia3.add_ia3/feedforward", lambda c: ia3.add_ia3(c["copy"](), ["q_proj"], feedforward_modules=["down_proj"]),
     ValueError, r"feedforward_modules \['down_proj'\] are not among the target modules \['q_proj'\]"),
    ("ia3.save_adapter/none-added", lambda c: ia3.save_adapter(c["copy"](), c["tmp"] / "x"),
     KeyError, r"no IA3 adapter named 'default' was added with add_ia3"),
    ("ia3.load_adapter/missing", lambda c: ia3.load_adapter(c["copy"](), c["tmp"] / "nothing"),
     FileNotFoundError, r"nothing holds no adapter_config\.json: not a saved adapter"),
    ("ia3.load_adapter/lora-folder", lambda c: ia3.load_adapter(c["copy"](), c["tmp"] / "lora"),
     ValueError, r"lora holds a LORA adapter, not IA3"),
    # --- lora
    ("lora.add_lora/r=0", lambda c: lora.add_lora(c["copy"](), ["q_proj"], r=0),
     ValueError, r"LoRA rank r=0 must be an integer in 1\.\.min\(in, out\)"),
    ("lora.add_lora/dropout", lambda c: lora.add_lora(c["copy"](), ["q_proj"], dropout=1.0),
     ValueError, r"dropout must be in \[0, 1\), got 1\.0"),
    ("lora.add_lora/targets-empty", lambda c: lora.add_lora(c["copy"](), []),
     ValueError, r"target_modules is empty: name the layers to adapt"),
    ("lora.add_lora/alpha-string", lambda c: lora.add_lora(c["copy"](), ["q_proj"], alpha="16"),
     TypeError, r"alpha must be a number \(the scale is alpha / r\), got '16'"),
    ("lora.add_lora/adapter_name", lambda c: lora.add_lora(c["copy"](), ["q_proj"], adapter_name=""),
     ValueError, r"adapter_name must be a non-empty string"),
    ("lora.add_lora/use_dora", lambda c: lora.add_lora(c["copy"](), ["q_proj"], use_dora="yes"),
     TypeError, r"use_dora must be True or False, got 'yes'"),
    ("lora.save_adapter/none-added", lambda c: lora.save_adapter(c["copy"](), c["tmp"] / "y"),
     KeyError, r"no adapter named 'default' was added with add_lora"),
    ("lora.load_adapter/missing", lambda c: lora.load_adapter(c["copy"](), c["tmp"] / "nothing"),
     FileNotFoundError, r"holds no adapter_config\.json: not a saved adapter"),
    ("lora.load_adapter/ia3-folder", lambda c: lora.load_adapter(c["copy"](), c["tmp"] / "ia3"),
     ValueError, r"ia3 holds a IA3 adapter, not LORA"),
    ("lora.merge_lora/none-added", lambda c: lora.merge_lora(c["copy"]()),
     ValueError, r"the model has no LoRA layers: call add_lora first"),
    # --- soft prompts (rows that pass today; course_lib/soft_prompts.py is another helper's file)
    ("soft_prompts.add_soft_prompt/method", lambda c: soft_prompts.add_soft_prompt(c["copy"](), "bogus"),
     ValueError, r"unknown soft-prompt method 'bogus'; use one of \['p-tuning', 'prefix', 'prompt'\]"),
    ("soft_prompts.add_soft_prompt/num_virtual_tokens", lambda c: soft_prompts.add_soft_prompt(c["copy"](), "prompt", 0),
     ValueError, r"num_virtual_tokens must be a positive integer, got 0"),
    ("soft_prompts.add_soft_prompt/init_text-no-tokenizer",
     lambda c: soft_prompts.add_soft_prompt(c["copy"](), "prompt", 4, init_text="hello"),
     ValueError, r"init_text needs the tokenizer"),
    ("soft_prompts.add_soft_prompt/encoder_type",
     lambda c: soft_prompts.add_soft_prompt(c["copy"](), "p-tuning", 4, encoder_type="GRU"),
     ValueError, r"encoder_type 'GRU': P-tuning's encoder is 'MLP' or 'LSTM'"),
    ("soft_prompts.save_adapter/plain-model", lambda c: soft_prompts.save_adapter(c["copy"](), c["tmp"] / "sp"),
     TypeError, r"save_adapter needs the SoftPromptModel that add_soft_prompt returned"),
    ("soft_prompts.load_adapter/missing", lambda c: soft_prompts.load_adapter(c["copy"](), c["tmp"] / "nothing"),
     FileNotFoundError, r"holds no adapter_config\.json: not a saved adapter"),
    # --- adapters
    ("adapters.find_targets/missing", lambda c: adapters.find_targets(c["model"], ["zzz"]),
     ValueError, r"target module\(s\) \['zzz'\] match no nn\.Linear"),
    ("adapters.read_peft_adapter/missing", lambda c: adapters.read_peft_adapter(c["tmp"] / "nothing", ["LORA"]),
     FileNotFoundError, r"holds no adapter_config\.json: not a saved adapter"),
    # --- reward model
    ("reward_model.bradley_terry_loss/shapes", lambda c: reward_model.bradley_terry_loss(torch.zeros(3), torch.zeros(2)),
     ValueError, r"r_chosen \(3,\) and r_rejected \(2,\) must have one shape"),
    ("reward_model.encode_texts/empty", lambda c: reward_model.encode_texts([], c["tok"]),
     ValueError, r"texts is empty: nothing to score"),
    ("reward_model.encode_pairs/missing", lambda c: reward_model.encode_pairs([{"prompt": "a", "chosen": "b"}], c["tok"]),
     ValueError, r"row 0: missing field\(s\) \['rejected'\]"),
    ("reward_model.last_token_index/empty-rows", lambda c: reward_model.last_token_index(torch.zeros(2, 3, dtype=torch.long)),
     ValueError, r"attention_mask row\(s\) \[0, 1\] have no real token.*drop empty texts"),
    ("reward_model.save_reward_model/plain-lm (AttributeError 'backbone' before)",
     lambda c: reward_model.save_reward_model(c["model"], c["tok"], c["tmp"] / "rm"),
     TypeError, r"save_reward_model saves a RewardModel .*got LlamaForCausalLM"),
    # --- dpo
    ("dpo.dpo_loss/beta", lambda c: dpo.dpo_loss(*[torch.zeros(2)] * 4, beta=0),
     ValueError, r"beta must be positive .*TRL's default is 0\.1.*got 0"),
    ("dpo.dpo_loss/loss_type", lambda c: dpo.dpo_loss(*[torch.zeros(2)] * 4, loss_type="bogus"),
     ValueError, r"unknown loss_type 'bogus'; known loss types are \["),
    ("dpo.dpo_loss/shapes", lambda c: dpo.dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2)),
     ValueError, r"the four log-prob tensors must have one shape"),
    ("dpo.dpo_loss/label_smoothing", lambda c: dpo.dpo_loss(*[torch.zeros(2)] * 4, label_smoothing=0.7),
     ValueError, r"label_smoothing .* must lie in \[0, 0\.5\), got 0\.7"),
    ("dpo.dpo_batches/batch_size", lambda c: next(iter(dpo.dpo_batches([PAIR], c["tok"], 0))),
     ValueError, r"batch_size must be positive, got 0"),
    ("dpo.as_reference/no-adapter", lambda c: dpo.as_reference(c["copy"]()).__enter__(),
     ValueError, r"no LoRA adapter to switch off.*add_lora.*precompute_reference_logprobs"),
    ("dpo.run_dpo/no-rows",
     lambda c: dpo.run_dpo(c["copy"](), [], c["tok"], training.TrainConfig(**ONE_STEP)),
     ValueError, r"no preference rows: a preference dataset needs rows \{'prompt', 'chosen', 'rejected'\}"),
    # --- grpo
    ("grpo.group_advantages/group_size", lambda c: grpo.group_advantages([1.0, 2.0], 1),
     ValueError, r"group_size must be an integer ≥ 2.*got 1"),
    ("grpo.group_advantages/uneven", lambda c: grpo.group_advantages([1.0, 2.0, 3.0], 2),
     ValueError, r"3 rewards do not split into groups of group_size=2"),
    ("grpo.group_advantages/scale", lambda c: grpo.group_advantages([1.0, 2.0], 2, scale="bogus"),
     ValueError, r"scale must be one of \('group', 'batch', 'none'\), got 'bogus'"),
    ("grpo.compute_rewards/none", lambda c: grpo.compute_rewards([], ["a"], ["b"]),
     ValueError, r"no reward functions: pass at least one"),
    ("grpo.grpo_loss/loss_type",
     lambda c: grpo.grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), loss_type="bogus"),
     ValueError, r"loss_type must be one of \('grpo', 'bnpo', 'dr_grpo', 'dapo'\), got 'bogus'"),
    ("grpo.grpo_loss/beta-without-ref",
     lambda c: grpo.grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), beta=0.1),
     ValueError, r"beta=0\.1 needs ref_logp.*or set beta=0\.0"),
    ("grpo.sample_completions/group_size",
     lambda c: grpo.sample_completions(c["model"], c["tok"], [{"prompt": "a"}], 1, max_new_tokens=2),
     ValueError, r"group_size must be ≥ 2 \(GRPO's baseline is the group\), got 1"),
    # --- ppo / rl
    ("ppo.PPOConfig/batch_size", lambda c: ppo.PPOConfig(batch_size=0),
     ValueError, r"batch_size must be positive, got 0"),
    ("ppo.PPOConfig/minibatch", lambda c: ppo.PPOConfig(batch_size=2, minibatch_size=4),
     ValueError, r"minibatch_size \(4\) cannot exceed batch_size \(2\)"),
    ("ppo.PPOConfig/temperature", lambda c: ppo.PPOConfig(temperature=0),
     ValueError, r"temperature must be positive \(PPO samples\), got 0"),
    ("ppo.gae/gamma", lambda c: ppo.gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), gamma=2),
     ValueError, r"gamma must lie in \[0, 1\], got 2"),
    ("ppo.run_ppo/no-prompts", lambda c: ppo.run_ppo(c["copy"](), c["tok"], [], lambda p, q: [0.0] * len(p), ppo.PPOConfig()),
     ValueError, r"prompts is empty: PPO needs prompts to continue"),
    ("ppo.AdaptiveKLController/init", lambda c: ppo.AdaptiveKLController(-1, 6, 100),
     ValueError, r"init_kl_coef must be ≥ 0, got -1"),
    ("rl.masked_mean/mask-shape", lambda c: rl.masked_mean(torch.zeros(2, 3), torch.ones(2, 2)),
     ValueError, r"mask has shape \(2, 2\) but x has shape \(2, 3\): they must match"),
    ("rl.token_logprobs/shapes", lambda c: rl.token_logprobs(torch.zeros(1, 2, 5), torch.zeros(1, 3, dtype=torch.long)),
     ValueError, r"logits \(1, 2, 5\) and tokens \(1, 3\) must agree on every dimension but the last"),
    # --- CLIs
    ("course-lab --only 42", lambda c: cli(lab.main, ["--only", "42"]),
     CLIError, r"rc=2: course-lab: error: --only 42: there is no lesson 42; lessons are 00-09"),
    ("course-lab --only abc", lambda c: cli(lab.main, ["--only", "abc"]),
     CLIError, r"rc=2: course-lab: error: --only abc: there is no lesson abc"),
    ("course-lab --profile tpu", lambda c: cli(lab.main, ["--profile", "tpu"]),
     CLIError, r"(?s)rc=2: .*--profile: invalid choice: 'tpu'"),
    ("course-lab --model ./missing", lambda c: cli(lab.main, ["--only", "00", "--model", "./no/such/model"]),
     CLIError, r"rc=2: course-lab: error: --model \./no/such/model: no such folder"),
    ("course-bench bogus", lambda c: cli(bench.main, ["bogus"]),
     CLIError, r"rc=2: course-bench: error: no benchmark 'bogus'.*available: "),
    ("course-bench --repeats x", lambda c: cli(bench.main, ["lora", "--repeats", "x"]),
     CLIError, r"(?s)rc=2: .*--repeats: invalid int value: 'x'"),
]


def test_there_are_at_least_40_bad_inputs():
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("call, error, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_raises_a_clear_error(ctx, call, error, message):
    random.seed(0)
    with pytest.raises(error, match=message):
        call(ctx)


def test_split_of_accepts_its_edges_0_and_100_percent():
    """The edges of heldout_percent's range are allowed and mean what they say (the rows above refuse beyond)."""
    keys = [f"story:{i}" for i in range(200)]
    assert {data.split_of(key, heldout_percent=0) for key in keys} == {"train"}
    assert {data.split_of(key, heldout_percent=100) for key in keys} == {"heldout"}
    assert {data.split_of(key, heldout_percent=50) for key in keys} == {"train", "heldout"}
