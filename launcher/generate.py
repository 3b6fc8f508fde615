"""`python -m launcher.generate` — greedy (default) or sampled text from a checkpoint, with a KV cache.

    python -m launcher.generate checkpoint.load=<checkpoint dir or iter_* dir> prompt="Once upon a time"
        [max_new_tokens=32] [temperature=0] [top_k=] [top_p=] [seed=0]
        [tokenizer=<tokenizer.json / dir / sentencepiece .model>] [model=<conf name or yaml>]
        [prompt_ids=1,2,3] [add_bos=true] [ignore_eos=false] [kv_cache=true] [output_json=<path>]

temperature=0 is greedy; otherwise logits/temperature, then top-k and/or top-p (nucleus)
filtering, sampled with a generator seeded by `seed` (same seed, same text). Padded vocabulary
ids (models.args.padded_vocab_size) are never produced. Generation stops at the tokenizer's EOS
unless ignore_eos=true. The tokenizer defaults to <checkpoint root>/tokenizer (what import_hf
copies); the model shape is found as in launcher.convert (model=, model.yaml, the run's config).
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
import sys
import warnings
from pathlib import Path

import torch

from launcher.convert import CliError, parse_overrides, resolve_checkpoint
from models.args import ModelArgs

warnings.filterwarnings("ignore", message=".*(Apex|apex|Transformer Engine|TransformerEngine).*")

DEFAULTS = {"checkpoint.load": None, "prompt": None, "prompt_ids": None, "max_new_tokens": "32",
            "temperature": "0", "top_k": None, "top_p": None, "seed": "0", "tokenizer": None, "model": None,
            "add_bos": None, "ignore_eos": "false", "kv_cache": "true", "output_json": None}


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
        raise CliError("the prompt is empty (give prompt=... or prompt_ids=...)")
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


def _bool(value: str | None, key: str) -> bool | None:
    if value is None:
        return None
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise CliError(f"{key}={value}: expected true or false")


def _number(value: str | None, key: str, kind: type) -> int | float | None:
    if value is None or value.lower() in ("null", "none"):
        return None
    try:
        return kind(value)
    except ValueError:
        raise CliError(f"{key}={value}: expected {'an integer' if kind is int else 'a number'}") from None


def run(argv: list[str]) -> dict:
    opts = parse_overrides(argv, DEFAULTS)
    if not opts["checkpoint.load"]:
        raise CliError("missing required argument checkpoint.load=<checkpoint dir>")
    if (opts["prompt"] is None) == (opts["prompt_ids"] is None):
        raise CliError("give exactly one of prompt=... and prompt_ids=...")
    max_new = _number(opts["max_new_tokens"], "max_new_tokens", int)
    temperature = _number(opts["temperature"], "temperature", float) or 0.0
    top_k = _number(opts["top_k"], "top_k", int)
    top_p = _number(opts["top_p"], "top_p", float)
    seed = _number(opts["seed"], "seed", int) or 0
    kv_cache, ignore_eos = _bool(opts["kv_cache"], "kv_cache"), _bool(opts["ignore_eos"], "ignore_eos")

    from launcher.convert import checkpoint_root, model_args_for

    directory = resolve_checkpoint(opts["checkpoint.load"])
    args: ModelArgs = model_args_for(directory, opts["model"])
    tokenizer = None
    tok_path = opts["tokenizer"] or (checkpoint_root(directory) / "tokenizer")
    if opts["tokenizer"] or (opts["prompt"] is not None and Path(tok_path).exists()):
        from launcher.data.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(tok_path)
        except (OSError, ValueError) as err:
            raise CliError(f"tokenizer={tok_path}: {err}") from err
    if opts["prompt_ids"] is not None:
        try:
            prompt = [int(t) for t in opts["prompt_ids"].split(",") if t.strip()]
        except ValueError:
            raise CliError(f"prompt_ids={opts['prompt_ids']}: expected comma-separated token ids") from None
    else:
        if tokenizer is None:
            raise CliError(f"prompt= needs a tokenizer: pass tokenizer=<path> (none at {tok_path})")
        prompt = tokenizer.encode(opts["prompt"])
        add_bos = _bool(opts["add_bos"], "add_bos")
        if tokenizer.bos_id is not None and add_bos is not False:
            prompt = [tokenizer.bos_id] + prompt
    bad = [t for t in prompt if not 0 <= t < args.vocab_size]
    if bad:
        raise CliError(f"prompt token {bad[0]} is outside the model's vocabulary (vocab_size={args.vocab_size})")
    eos_id = None if ignore_eos or tokenizer is None else tokenizer.eos_id

    from launcher.convert import build_model, init_world_of_one, load_model_weights
    from parallel.megatron_engine import shutdown

    init_world_of_one(seed)
    try:
        model = build_model(args)
        load_model_weights(model, directory, args)
        new = generate(model, prompt, vocab_size=args.vocab_size, max_new_tokens=max_new, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id, kv_cache=kv_cache)
    finally:
        shutdown()
    result = {"prompt_ids": prompt, "generated_ids": new}
    if tokenizer is not None:
        # decode the continuation in context: sentencepiece drops a word's leading space when a
        # piece is decoded on its own
        head, full = tokenizer.decode(prompt), tokenizer.decode(prompt + new)
        result["text"] = full[len(head):] if full.startswith(head) else tokenizer.decode(new)
        print(f"{opts['prompt'] if opts['prompt'] is not None else head}{result['text']}")
    else:
        print(f"generated ids: {new}")
    if opts["output_json"]:
        Path(opts["output_json"]).write_text(json.dumps(result))
    return result


def main(argv: list[str]) -> int:
    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        run(argv)
    except CliError as err:
        print(f"generate: error: {err}", file=sys.stderr)
        return 2
    except CheckpointingException as err:
        print(f"generate: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
