"""`python -m launcher.generate` — greedy (default) or sampled text from a checkpoint, with a KV cache.

    python -m launcher.generate checkpoint.load=<checkpoint dir or iter_* dir> prompt="Once upon a time"
        [max_new_tokens=32] [temperature=0] [top_k=null] [top_p=null] [seed=0]
        [tokenizer=<tokenizer.json / dir / sentencepiece .model>] [model=<conf name or yaml>]
        [prompt_ids=1,2,3] [add_bos=true] [ignore_eos=false] [kv_cache=true] [output_json=<path>]
    python -m launcher.generate --help      (every key and its default)

A Hydra app like launcher.train (structured config `GenerateConfig` below; an unknown key is an
error). `prompt` and `prompt_ids` are text as typed: commas, colons and quotes in them are not
Hydra syntax.

temperature=0 is greedy; otherwise logits/temperature, then top-k and/or top-p (nucleus)
filtering, sampled with a generator seeded by `seed` (same seed, same text). Padded vocabulary
ids (models.args.padded_vocab_size) are never produced. Generation stops at the tokenizer's EOS
unless ignore_eos=true. The tokenizer and the model shape default to the checkpoint's own (its
tokenizer/ and model.yaml: launcher/checkpoint_files.py, written by training and by import_hf);
model= takes a conf/model name, a yaml path or another checkpoint.
`prompt_ids=` feeds token ids directly (no tokenizer needed). kv_cache=false recomputes the
whole sequence at every step (the reference the cache is tested against).

The KV cache is megatron-core's StaticInferenceContext passed to GPTModel.forward: the prompt runs
once (causal: query and key lengths are equal), then one token per step attends to every cached
position (megatron switches the mask type to no_mask once the cache is non-empty, which is exact
for a single query token; our SDPA core attention is therefore unchanged).

Runs in a world of one on CPU (a model that fits one process); the functions below also work
on a tensor-parallel model (the output layer gathers the vocab-parallel logits).
"""
from __future__ import annotations

import json
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from launcher.cli import hydra_command
from launcher.config.validate import ConfigError
from launcher.model_io import resolve_checkpoint
from models.args import ModelArgs

warnings.filterwarnings("ignore", message=".*(Apex|apex|Transformer Engine|TransformerEngine).*")
# Keys whose value is free text: passed to Hydra quoted, so that `,` `:` `[` and quotes stay text.
TEXT_KEYS = ("prompt", "prompt_ids")


@torch.no_grad()
def forward_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Full causal forward without cache: tokens [b, s] -> logits [b, s, padded vocab] (fp32)."""
    positions = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
    # runtime_gather_output: the output layer all-gathers its vocab-parallel logits over TP
    return model(tokens, positions, None, runtime_gather_output=True).float()


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: list[int], *, vocab_size: int, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | None = None, kv_cache: bool = True) -> list[int]:
    """New token ids after `prompt` (batch of one)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    if not prompt:
        raise ConfigError("prompt", "the prompt is empty (give prompt=... or prompt_ids=...)")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = list(prompt)
    context = StaticInferenceContext(max_batch_size=1, max_sequence_length=len(prompt) + max_new_tokens)
    step_input = tokens
    for _ in range(max_new_tokens):
        if kv_cache:
            ids = torch.tensor([step_input])
            positions = torch.arange(context.sequence_len_offset, context.sequence_len_offset + len(step_input))
            # only the last position's logits are materialized (StaticInferenceContext default)
            logits = model(ids, positions.unsqueeze(0), None, inference_context=context,
                           runtime_gather_output=True)[0, -1]
            context.sequence_len_offset += len(step_input)
            context.enable_decode_mode()
        else:
            logits = forward_logits(model, torch.tensor([tokens]))[0, -1]
        # padded vocab rows are not tokens
        token = _sample(logits[:vocab_size].float(), temperature, top_k, top_p, generator)
        tokens.append(token)
        step_input = [token]
        if eos_id is not None and token == eos_id:
            break
    return tokens[len(prompt):]


@dataclass
class CheckpointRef:
    load: Optional[str] = None  # checkpoint root or iter_* directory (required)


@dataclass
class GenerateConfig:
    checkpoint: CheckpointRef = field(default_factory=CheckpointRef)
    prompt: Optional[str] = None  # text, encoded with the tokenizer (or give prompt_ids)
    prompt_ids: Optional[str] = None  # comma-separated token ids instead of a prompt (no tokenizer needed)
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: Optional[int] = None  # keep the k most likely tokens (sampling)
    top_p: Optional[float] = None  # keep the smallest set of tokens holding this probability (sampling)
    seed: int = 0  # the sampling generator's seed
    tokenizer: Optional[str] = None  # tokenizer.json / dir / sentencepiece .model (default: the checkpoint's)
    model: Optional[str] = None  # conf/model name, yaml path or checkpoint (default: the checkpoint's shape)
    add_bos: Optional[bool] = None  # prepend the tokenizer's BOS to a text prompt (default: when it has one)
    ignore_eos: bool = False  # generate max_new_tokens even past EOS
    kv_cache: bool = True  # false: recompute the whole sequence every step (the cache's reference)
    output_json: Optional[str] = None  # also write {prompt_ids, generated_ids, text} here


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


def run(cfg: DictConfig) -> dict:
    if not cfg.checkpoint.load:
        raise ConfigError("checkpoint.load", "required (a checkpoint root or iter_* directory)")
    if (cfg.prompt is None) == (cfg.prompt_ids is None):
        raise ConfigError("prompt", "give exactly one of prompt=... and prompt_ids=...")

    from launcher.checkpoint_files import TOKENIZER_DIR, find
    from launcher.model_io import model_args_for

    directory = resolve_checkpoint(cfg.checkpoint.load, "checkpoint.load")
    args: ModelArgs = model_args_for(directory, cfg.model)
    tokenizer = None
    tok_path = cfg.tokenizer or find(directory, TOKENIZER_DIR) or directory / TOKENIZER_DIR
    if cfg.tokenizer or (cfg.prompt is not None and Path(tok_path).exists()):
        from launcher.data.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(tok_path)
        except (OSError, ValueError) as err:
            raise ConfigError("tokenizer", f"{tok_path}: {err}") from err
    if cfg.prompt_ids is not None:
        try:
            prompt = [int(t) for t in cfg.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ConfigError("prompt_ids", f"{cfg.prompt_ids!r}: expected comma-separated token ids") from None
    else:
        if tokenizer is None:
            raise ConfigError("tokenizer", f"prompt= needs a tokenizer: pass tokenizer=<path> (none at {tok_path})")
        prompt = tokenizer.encode(cfg.prompt)
        if tokenizer.bos_id is not None and cfg.add_bos is not False:
            prompt = [tokenizer.bos_id] + prompt
    bad = [t for t in prompt if not 0 <= t < args.vocab_size]
    if bad:
        raise ConfigError("prompt", f"token {bad[0]} is outside the model's vocabulary (vocab_size={args.vocab_size})")
    eos_id = None if cfg.ignore_eos or tokenizer is None else tokenizer.eos_id

    from launcher.model_io import build_model, init_world_of_one, load_model_weights
    from parallel.megatron_engine import shutdown

    from parallel.lora_checkpoint import read_reference

    reference = read_reference(directory)
    init_world_of_one(cfg.seed)
    try:
        if reference is None:
            model = build_model(args)
            load_model_weights(model, directory, args, key="checkpoint.load")
        else:  # LoRA adapters: on their base, unmerged
            from launcher.lora_convert import lora_model_of, lora_reference

            model = lora_model_of(*lora_reference(str(directory), "checkpoint.load"))
        new = generate(model, prompt, vocab_size=args.vocab_size, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed, eos_id=eos_id,
                       kv_cache=cfg.kv_cache)
    finally:
        shutdown()
    result = {"prompt_ids": prompt, "generated_ids": new}
    if tokenizer is not None:
        # decode the continuation in context: sentencepiece drops a word's leading space when a
        # piece is decoded on its own
        head, full = tokenizer.decode(prompt), tokenizer.decode(prompt + new)
        result["text"] = full[len(head):] if full.startswith(head) else tokenizer.decode(new)
        print(f"{cfg.prompt if cfg.prompt is not None else head}{result['text']}")
    else:
        print(f"generated ids: {new}")
    if cfg.output_json:
        Path(cfg.output_json).write_text(json.dumps(result))
    return result


@hydra_command("generate", config_dir="tools", argv=lambda args: quote_text(args))
def main(cfg: DictConfig) -> None:
    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        run(cfg)
    except ConfigError as err:
        print(f"generate: error: {err.key}: {err.reason}", file=sys.stderr)
        sys.exit(2)
    except CheckpointingException as err:
        print(f"generate: error: checkpoint.load: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


def hydra_quoted(text: str) -> str:
    """`text` as a Hydra single-quoted string that parses back to `text`: a quote is escaped, and so
    are the backslashes before a quote or at the end (Hydra keeps other backslashes as they are);
    `${` is escaped so that no interpolation is resolved."""
    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return "'" + text.replace("${", "\\${") + "'"


def quote_text(argv: list[str]) -> list[str]:
    """TEXT_KEYS' values as Hydra quoted strings (the rest of the command line is Hydra's)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        out.append(f"{key}={hydra_quoted(value)}" if sep and key in TEXT_KEYS else arg)
    return out


if __name__ == "__main__":
    main()
