"""Loading the base model and tokenizer, the way every stage does it.

The base is loaded once per process: 4-bit NF4 with double quantisation (QLoRA) by default, or full precision
with `model.quantization: none`. LoRA adapters train on top; nothing of the base is updated.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from align.errors import AlignError
from align.recipe import DType, LoraConfig, ModelConfig, Quantization, RecipeError, section_name

log = logging.getLogger(__name__)

# For base models that ship no chat template: plain text, no new tokens (a base model has no trained
# embeddings for tokens it never saw), and the assistant turn ends in the EOS token the model already knows.
# The prompt rendered with add_generation_prompt is a token prefix of prompt + answer: the boundary falls
# after "Assistant:", before the answer's leading space.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


class ModelLoadError(AlignError, RuntimeError):
    """The model cannot be loaded as configured; the message names the setting to change."""


def device() -> torch.device:
    """This process's device under Accelerate (its GPU, or the CPU)."""
    from align.processes import state

    return state().device


def compute_dtype(cfg: ModelConfig) -> torch.dtype:
    return _compute_dtype(cfg)[0]


def _compute_dtype(cfg: ModelConfig) -> tuple[torch.dtype, str]:
    """The compute dtype and why it is that one."""
    if cfg.compute_dtype != DType.auto:
        return getattr(torch, cfg.compute_dtype.value), "model.compute_dtype"
    if device().type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU supports bfloat16"
        return torch.float16, "auto: this GPU lacks bfloat16"
    if cpu_has_amx_bf16():
        return torch.bfloat16, "auto: this CPU has AMX bfloat16 units (lscpu: amx_bf16)"
    return torch.float32, "auto: this CPU has no AMX bfloat16 units (lscpu: no amx_bf16), where bfloat16 is slower"


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bfloat16 tile units (`amx_bf16` in lscpu's flags): there a bfloat16 matmul runs
    several times faster than a float32 one (7x on a 2048 x 2048 matmul on an AMX Xeon, bench/README.md). With
    AVX-512 BF16 alone the gain is not measured here, so float32 stays the default there."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:  # not Linux: torch's own probe
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(probe and probe())


def half_on_cpu(cfg: ModelConfig) -> bool:
    """Whether this process computes in a 16-bit dtype on a CPU: the trainable weights then stay float32
    (`trainable_in_float32`) and every forward runs under autocast (`load_model`)."""
    return device().type == "cpu" and compute_dtype(cfg) != torch.float32


def precision_args(cfg: ModelConfig) -> dict[str, bool]:
    """The trainer's mixed-precision flags, derived from the one compute dtype (TRL defaults bf16=True).
    transformers refuses bf16 without a GPU unless told the run is on the CPU (use_cpu)."""
    dtype = compute_dtype(cfg)
    cpu = {"use_cpu": True} if half_on_cpu(cfg) else {}
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16, **cpu}


def load_tokenizer(cfg: ModelConfig):
    """Tokenizer with a pad token and a chat template, so every stage renders prompts the same way."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(
        AutoTokenizer, cfg, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if cfg.chat_template is not None:
        template = Path(cfg.chat_template)
        is_file = cfg.chat_template.endswith((".jinja", ".j2")) and template.is_file()
        tokenizer.chat_template = template.read_text() if is_file else cfg.chat_template
    elif tokenizer.chat_template is None:
        log.info("%s has no chat template; using align's default User:/Assistant: template", cfg.name_or_path)
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    turn_end = _checked(lambda: end_of_turn(tokenizer), cfg)
    if turn_end is not None and turn_end != tokenizer.eos_token:
        # Generation (align's and TRL's), SFT's labels and PPO's completion mask all stop at tokenizer.eos_token:
        # it must be the token that ends an answer, not the end of a document (as LLaMA-Factory does too).
        log.info("answers end at %s (the chat template's end of turn), not at the tokenizer's EOS %s: using %s as "
                 "EOS", turn_end, tokenizer.eos_token, turn_end)
        tokenizer.eos_token = turn_end
    if tokenizer.pad_token is None:
        # Padding is masked out of attention and loss, so reusing EOS is safe; answers still end in a real EOS.
        tokenizer.pad_token = tokenizer.eos_token
    # align measures every row against the stage's max_length itself and says what is too long (data.checks), and
    # the trainers truncate to theirs: transformers' "longer than the specified maximum" warning only confuses.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def checkpoint_tokenizer(checkpoint: str | Path, cfg: ModelConfig):
    """The tokenizer a stage saved beside its adapter (it carries the chat template the stage trained with); a bare
    adapter has none: then the base's, as `load_tokenizer` makes it."""
    from transformers import AutoTokenizer

    checkpoint = Path(checkpoint)
    if (checkpoint / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(checkpoint))
    return load_tokenizer(cfg)


def _checked(render, cfg: ModelConfig):
    """`render()`, with a chat template that cannot render a conversation (a syntax error, an unknown variable,
    an attribute its sandbox refuses) made one line naming where the template came from."""
    from jinja2 import TemplateError

    try:
        return render()
    except TemplateError as e:
        source = "model.chat_template" if cfg.chat_template is not None else f"{cfg.name_or_path}'s chat template"
        raise RecipeError(f"{source}: cannot render a conversation ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'no message'}); fix the template, or set "
                          "model.chat_template to one that renders") from None


def end_of_turn(tokenizer) -> str | None:
    """The special token the chat template puts right after an assistant's answer (<|im_end|> in ChatML,
    <|eot_id|> in Llama 3, EOS in align's default template); None if it puts none there."""
    probe = [{"role": "user", "content": "1 + 1"}, {"role": "assistant", "content": "2"}]
    whole = conversation_ids(tokenizer, [probe])[0]
    prompt = prompt_ids(tokenizer, probe[:1])
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    from_answer = whole[shared_prefix(prompt, whole):]
    return next((tokenizer.convert_ids_to_tokens(i) for i in from_answer if i in special), None)


def shared_prefix(prompt: list[int], conversation: list[int]) -> int:
    """How many leading token ids the prompt rendered alone shares with the rendered conversation: where the
    answer starts."""
    return next((i for i, (a, b) in enumerate(zip(prompt, conversation)) if a != b), len(prompt))


def quantization_config(cfg: ModelConfig):
    """bitsandbytes NF4 config, or None for a full-precision base. Fails early, naming the setting to change."""
    if cfg.quantization == Quantization.none:
        return None
    where = device().type
    try:
        import bitsandbytes  # noqa: F401  (only needed for 4-bit; importing align must not require it)
    except ImportError as e:
        raise ModelLoadError(
            f"model.quantization=nf4 needs bitsandbytes, which cannot be imported here ({e}). "
            "Install it (pip install bitsandbytes) or set model.quantization=none for a full-precision base."
        ) from None
    if where not in ("cuda", "cpu"):  # the devices align's 4-bit path is tested on
        raise ModelLoadError(
            f"4-bit NF4 is not available on this device ({where}); align runs it on CUDA GPUs and CPUs. "
            "Set model.quantization=none to train on a full-precision base."
        )
    from transformers import BitsAndBytesConfig

    # FSDP shards float tensors only, and wraps a block's modules together only when they share one dtype: under
    # FSDP the packed 4-bit weights are stored in the compute dtype instead of uint8 (bitsandbytes' FSDP-QLoRA
    # guide). Elsewhere uint8 storage is the tested default.
    storage = {"bnb_4bit_quant_storage": compute_dtype(cfg)} if fsdp_launched() else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(cfg),
        **storage,
    )


def fsdp_launched() -> bool:
    """Whether `accelerate launch` runs this process with an FSDP config (recipes/accelerate/fsdp_qlora.yaml)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def checkpointing(stage) -> dict[str, Any] | None:
    """A stage section's activation checkpointing as transformers' activation_checkpointing_kwargs (None: off).
    Non-reentrant: the reentrant variant needs every checkpointed input to require grad."""
    if not stage.activation_checkpointing:
        return None
    if stage.activation_checkpointing_offload and device().type != "cuda":
        raise RecipeError(f"{section_name(stage)}.activation_checkpointing_offload=true: it moves checkpointed "
                          f"activations from the GPU to pinned CPU memory, and this process runs on the "
                          f"{device().type}; set it false")
    return {"use_reentrant": False, "every_n_layers": stage.activation_checkpointing_every_n_layers,
            "offload": stage.activation_checkpointing_offload}


def load_model(cfg: ModelConfig, *, head: str = "lm", activation_checkpointing: dict[str, Any] | None = None):
    """The base model on this process's device, frozen and ready for LoRA (on 4-bit, with activation
    checkpointing (`checkpointing(stage)`): inputs that carry gradients through the checkpointed layers).
    head="lm": the causal LM; head="score": the same body with a fresh one-output linear head (a reward model;
    the LM head is dropped)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head not in ("lm", "score"):
        raise ValueError(f"head must be 'lm' or 'score', not {head!r}")
    model_class = AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification
    quant = quantization_config(cfg)
    kwargs = dict(
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=compute_dtype(cfg),
        attn_implementation=cfg.attn_implementation,
    )
    if quant is not None:
        kwargs["quantization_config"] = quant
        if not fsdp_launched():  # under FSDP, FSDP places the shards
            # bitsandbytes quantises while loading, onto the device it is given: this process's device.
            kwargs["device_map"] = {"": device()}
    if head == "score":
        from trl.trainer.reward_trainer import suppress_seqcls_warning

        with suppress_seqcls_warning():  # "score.weight missing, lm_head unexpected" is what a new head means
            model = _from_pretrained(model_class, cfg, num_labels=1, **kwargs)
    else:
        model = _from_pretrained(model_class, cfg, **kwargs)
    from align.generation import use_merged_generation

    use_merged_generation(model, cfg.merged_generation)
    dtype, why = _compute_dtype(cfg)
    log.info("computing in %s (%s)", str(dtype).removeprefix("torch."), why)
    if half_on_cpu(cfg):
        autocast_forward(model, dtype)
    score_labelled_positions_only()
    if quant is not None:
        keep_4bit_on_the_autograd_path(model)
        # What peft's prepare_model_for_kbit_training does, less its upcast of every unquantised weight
        # (embeddings, LM head, norms) to fp32: with bf16 compute that cost 3.7 GiB and 23% of the SFT step
        # time on a 7B model (bench/README.md), and TRL's own trainers do without it.
        model.requires_grad_(False)
        if activation_checkpointing:
            kwargs = dict(activation_checkpointing)
            model.activation_checkpointing_enable(every_n_layers=kwargs.pop("every_n_layers"),
                                                  offload=kwargs.pop("offload"), activation_checkpointing_kwargs=kwargs)
            model.enable_input_require_grads()
    return model


def autocast_forward(model, dtype: torch.dtype) -> None:
    """Every forward of `model` under CPU autocast in `dtype`, its floating outputs (logits, values) in float32,
    as Accelerate wraps a model it prepares for mixed precision: align's own passes (rollouts, log-probs,
    evaluation, scoring) then compute as the trainer's do, and the float32 trainable weights (`trainable_in_float32`)
    meet the 16-bit base inside autocast, not in a dtype mismatch."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    # The body too: the shared-base reward and value heads call it directly (rewards.SharedBaseRewardModel).
    for module in {id(m): m for m in (model, model.base_model)}.values():
        forward = torch.autocast("cpu", dtype=dtype)(module.forward.__func__)
        module.forward = MethodType(convert_outputs_to_fp32(forward), module)


def keep_4bit_on_the_autograd_path(model) -> None:
    """Keeps every 4-bit layer on bitsandbytes' standard (dequantise + matmul) path, which has autograd.

    bitsandbytes 0.50.2, on a CPU with AVX-512 BF16 (`has_avx512bf16()`): the first forward of a `Linear4bit` in
    eval mode without gradients (the "before" evaluation of every stage) repacks its weight into a CPU-only layout
    (`_convert_weight_packed_for_cpu`) for a fused bf16 `gemv_4bit` kernel, and the layer computes through that
    kernel from then on, in training too. The kernel has no autograd, so the gradient through the frozen 4-bit
    weights to the LoRA adapters of earlier layers is wrong (the quickstart SFT learned nothing), and inference
    runs in bf16 whatever the compute dtype. `support_avx512bf16_for_cpu` is the layer's switch for that path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def score_labelled_positions_only() -> None:
    """TRL's fused LM head (SFT, GRPO, DPO and KTO log-probabilities) projects only the positions that have a label
    through the vocabulary where Triton runs, and every position elsewhere (fixed tile shapes, for compilers such
    as Neuron's). On a CPU that means the prompt and the padding too, which the loss then masks out: in SFT on
    SmolLM2 two thirds of the tokens, each through a 49k-token log-softmax and its backward. Here a CPU takes the
    labelled positions' path as well; the loss, log-probabilities and gradients are the same (tests/
    test_modeling.py), the SmolLM2 SFT step 1.3x faster (README "On CPUs"). In TRL 1.16 `trl.trainer.utils.
    _use_triton` makes only that choice there (the kernels read their own copy of it)."""
    import trl.trainer.utils as trl_utils

    on_triton = trl_utils._use_triton
    if getattr(on_triton, "align_scores_labelled_positions", False):
        return

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or on_triton(device)

    compact.align_scores_labelled_positions = True
    trl_utils._use_triton = compact


def trainable_weights(model) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights, to restore exactly after a trainer has rounded them
    (`trainable_in_float32`)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def trainable_in_float32(model, cfg: ModelConfig, exact: dict[str, torch.Tensor] | None = None) -> None:
    """Call after building a TRL trainer. TRL stores the trainable weights of a quantized model (LoRA, heads) in
    bf16, as the QLoRA paper does on GPUs. On a CPU they go back to float32: in float32 compute bf16 weights only
    cost speed and precision, and in bf16 compute (autocast, `half_on_cpu`) float32 weights are the master copy
    Adam updates without rounding each step away. Back to their `exact` values from before the trainer when given
    (a pretrained adapter, e.g. the SFT policy RL starts from, must stay the SFT policy), else widened."""
    if compute_dtype(cfg) == torch.float32 or half_on_cpu(cfg):
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data = exact[name].float() if exact and name in exact else param.data.float()


def _from_pretrained(auto_class, cfg: ModelConfig, **kwargs):
    missing = missing_local_path(cfg.name_or_path)
    if missing:
        raise ModelLoadError(f"model.name_or_path={cfg.name_or_path!r}: {missing}")
    try:
        return auto_class.from_pretrained(cfg.name_or_path, **kwargs)
    except (OSError, ValueError) as e:  # not found, no access, no network; a directory that is not a model
        raise ModelLoadError(f"model.name_or_path={cfg.name_or_path!r} could not be loaded: {e}") from None


def model_context(cfg: ModelConfig) -> int | None:
    """The model's context in tokens (max_position_embeddings in its config); None if its config does not say
    or cannot be read (loading the model then says why)."""
    from transformers import AutoConfig

    try:
        config = _from_pretrained(AutoConfig, cfg, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except ModelLoadError:
        return None
    context = getattr(config, "max_position_embeddings", None)
    return context if isinstance(context, int) else None


def check_context(cfg: ModelConfig, max_length: int, key: str) -> None:
    """A stage's max_length (`key`) must fit the model's context: longer sequences would fail deep in training, or
    silently degrade with some position encodings."""
    context = model_context(cfg)
    if context is not None and max_length > context:
        raise RecipeError(f"{key}={max_length} is longer than {cfg.name_or_path}'s context of {context} tokens "
                          f"(max_position_embeddings); set {key} to at most {context}")


def missing_local_path(name: str) -> str | None:
    """Why `name` is a local path that is not there (None: it exists, or it reads as a hub id). Said at once,
    instead of after a minute of retries against the hub for a repository called 'data/tiny-basee'."""
    path = Path(name).expanduser()
    if path.is_dir():
        return None
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or (
        "/" in name and Path(name.split("/")[0]).is_dir())
    if not looks_local:
        return None
    import difflib

    # Only model directories with a name close to the one given: the parent may be a shared directory (/tmp)
    # whose other entries are nobody else's business.
    models = [p.name for p in path.parent.iterdir() if (p / "config.json").is_file()] if path.parent.is_dir() else []
    close = difflib.get_close_matches(path.name, models, n=3)
    nearby = f"; model directories in {path.parent} with a similar name: {', '.join(close)}" if close else ""
    return f"no such directory ({path.resolve()}){nearby}. A hub model id is owner/name"


def lora_config(cfg: LoraConfig, task_type: str = "CAUSAL_LM"):
    """PEFT's LoRA config. For a reward model (SEQ_CLS) the score head is trained in full and saved with the
    adapter (`modules_to_save`); without it a reloaded reward model would get a random head."""
    from peft import LoraConfig as PeftLoraConfig

    targets = cfg.target_modules
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )


def load_adapter_weights(model, adapter_dir: str | Path, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Copy a saved LoRA adapter's weights into `model`'s adapter `adapter_name` (e.g. the SFT adapter into a
    reward model on the same base): every saved LoRA weight must find its place, or the adapter was made for
    another model. Returns the saved weights that are not LoRA and have no place here (a reward model's score
    head, when its adapter goes onto a causal LM)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"{adapter_dir}: no adapter_model.safetensors; expected a LoRA adapter directory")
    current, saved = get_peft_model_state_dict(model, adapter_name=adapter_name), load_file(weights)
    no_place = sorted(k for k in saved.keys() - current.keys() if "lora_" in k)
    not_saved = sorted(k for k in current.keys() - saved.keys() if "lora_" in k)
    if no_place or not_saved:
        raise ModelLoadError(
            f"{adapter_dir}: the adapter does not fit this model ({len(no_place)} of its weights have no place, "
            f"e.g. {(no_place or ['-'])[0]}; {len(not_saved)} LoRA weights missing, e.g. {(not_saved or ['-'])[0]}); "
            "was it trained on another base model or with other lora.target_modules?"
        )
    placed = {k: v for k, v in saved.items() if k in current}
    # What the adapter lacks (a new head) stays as it is.
    set_peft_model_state_dict(model, {**current, **placed}, adapter_name=adapter_name)
    return {k: v for k, v in saved.items() if k not in current}


def copy_adapter_weights(model, source: str, target: str) -> None:
    """Copy the weights of LoRA adapter `source` into adapter `target` (same configuration) of one PeftModel."""
    for name, param in model.named_parameters():
        if f".{source}." in name:
            model.get_parameter(name.replace(f".{source}.", f".{target}.")).data.copy_(param.data)


def conversation_ids(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """Token ids of whole conversations (prompt + answer, no generation prompt): what the reward model is trained
    and scored on, and what TRL's trainers tokenize (the template's text, no special tokens added)."""
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt as every stage renders it: chat template plus the generation prompt."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def sft_tokens(prompt: list[int], conversation: list[int], eos_token_id: int) -> dict[str, list[int]]:
    """A prompt-completion pair as SFT trains on it, from the token ids of its prompt rendered alone (with the
    generation prompt, as generation sees it: `prompt_ids`) and of the whole conversation (`conversation_ids`):
    the conversation's ids up to and including the EOS (end of turn) that closes the answer, and a completion mask
    that is 1 on the answer and that EOS. What the template puts after the end of turn (ChatML's newline after
    <|im_end|>) is left out: generation stops at EOS, so the model never sees or produces it. The prompt is the
    part the prompt rendered alone shares with the conversation; a template that renders the two differently is
    caught by `align run`'s prompt-rendering gate. A template that ends the answer with no EOS gets one, so that
    the model learns to stop."""
    start = shared_prefix(prompt, conversation)
    end = conversation.index(eos_token_id, start) + 1 if eos_token_id in conversation[start:] else None
    ids = conversation[:end] if end else conversation + [eos_token_id]
    return {"input_ids": ids, "completion_mask": [0] * start + [1] * (len(ids) - start)}


EXPORT_MARK = "align_export.json"


def export_merged(checkpoint: str | Path, out: str | Path, cfg: ModelConfig | None = None, *,
                  overwrite: bool = False) -> Path:
    """Merge a causal-LM LoRA checkpoint into a full-precision copy of its base and save a standard transformers
    model + tokenizer at `out` (renamed into place once complete). A 4-bit base is dequantised first, so the
    merged weights are those the adapter was trained on: the merged model computes what adapter + 4-bit base
    computed. `cfg`: how the base was loaded in training (the run's config.yaml); by default the base named in
    the adapter's config, in 4-bit NF4."""
    from peft import PeftConfig, PeftModel

    from align.rundir import replace_dir

    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not overwrite and not (out / EXPORT_MARK).is_file() and (
            not out.is_dir() or any(out.iterdir())):
        raise ModelLoadError(f"--out {out}: it exists and is not an earlier export (no {EXPORT_MARK}); exporting "
                             "would replace what is in it. Choose a new directory, or pass --overwrite")
    adapter = PeftConfig.from_pretrained(str(checkpoint))
    if adapter.task_type != "CAUSAL_LM":
        raise ModelLoadError(f"{checkpoint}: a {adapter.task_type} adapter (a reward model?), not a policy; export "
                             "takes an sft, grpo or ppo checkpoint")
    cfg = cfg or ModelConfig(name_or_path=adapter.base_model_name_or_path)
    base = load_model(cfg)
    if cfg.quantization != Quantization.none:
        base = base.dequantize()  # NF4 -> the compute dtype, the values the adapter was trained against
    merged = PeftModel.from_pretrained(base, str(checkpoint)).merge_and_unload()
    tokenizer = checkpoint_tokenizer(checkpoint, cfg)
    # Plain transformers' generate stops at the generation config's EOS ids: the end of turn answers end with.
    stops = merged.generation_config.eos_token_id
    stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    merged.generation_config.eos_token_id = [tokenizer.eos_token_id, *(i for i in stops if i != tokenizer.eos_token_id)]
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    staging = out.with_name(out.name + ".tmp")
    merged.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    (staging / EXPORT_MARK).write_text(json.dumps({"checkpoint": str(checkpoint.resolve()),
                                                   "base": cfg.name_or_path}, indent=1) + "\n")
    replace_dir(staging, out)
    return out
