"""A real vLLM engine on CPU, driven line by line: run by the interop tests, demos and
benchmarks in the interop venv (tools/interop_venv.sh), never in .venv.

The model is a tiny random Llama built here with ``transformers`` (2 layers, hidden 128,
head_dim 64, vocab 512; no hub access), or the one at ``model_dir`` when it exists. vLLM runs
with prefix caching, ``block_size`` 32 (the CPU attention needs a multiple of 32) and a small
``num_gpu_blocks_override`` so that prompts evict each other. Usage::

    python vllm_engine.py CONFIG_JSON

CONFIG_JSON keys: ``model_dir`` (and ``model_shape``, LlamaConfig fields of a model built
there instead of the tiny one); ``num_blocks`` (16), ``max_model_len`` (256),
``max_num_seqs`` (2), ``max_tokens`` (1 token generated per request); ``endpoint``,
``replay_endpoint``, ``topic`` (publish KV-cache events); ``kv_transfer_config`` (a KV
connector). Commands on stdin, one JSON object a line, each answered by one JSON line on
stdout::

    {"op": "generate", "tokens": [...]}   -> {"cached": n, "tokens": [...], "logprobs": [...],
                                             "seconds": s}  (greedy; n: prompt tokens vLLM did
                                             not compute, from its prefix cache or a connector)
    {"op": "reset"}                       -> {"ok": <bool>} (reset_prefix_cache)
    {"op": "stop"}                        -> {"ok": true}, then the process exits
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def build_tiny_llama(path: Path, shape: dict | None = None) -> None:
    """A random Llama at ``path`` (kept when it exists): the tiny one, or with ``shape``'s
    LlamaConfig fields instead (e.g. more layers and a longer context for benchmarks)."""
    if (path / "config.json").exists():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                  torch_dtype="float32", tie_word_embeddings=False)
    fields.update(shape or {})
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**fields)).save_pretrained(path, safe_serialization=True)


def build_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer for the tiny Llama (ids 0-255: the bytes; 256: ``<s>``, added in
    front of every prompt; 257: ``</s>``), so the OpenAI server can take text prompts."""
    if (path / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({"<s>": 256, "</s>": 257})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(path)


def main() -> int:
    config = json.loads(sys.argv[1])
    # vLLM and its engine process print to stdout: keep fd 1 for the replies, send the rest to stderr
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(obj: dict) -> None:
        replies.write(json.dumps(obj) + "\n")

    for name, value in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                        ("OMP_NUM_THREADS", "1")):
        os.environ.setdefault(name, value)
    model = Path(config["model_dir"])
    build_tiny_llama(model, config.get("model_shape"))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    options: dict = {}
    if config.get("endpoint"):
        events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": config["endpoint"],
                  "topic": config.get("topic", "")}
        if config.get("replay_endpoint"):
            events["replay_endpoint"] = config["replay_endpoint"]
        options["kv_events_config"] = events
    if config.get("kv_transfer_config"):
        options["kv_transfer_config"] = config["kv_transfer_config"]
    llm = LLM(model=str(model), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              max_model_len=config.get("max_model_len", 256), block_size=32, enable_prefix_caching=True,
              num_gpu_blocks_override=config.get("num_blocks", 16), max_num_seqs=config.get("max_num_seqs", 2),
              tensor_parallel_size=config.get("tensor_parallel_size", 1), **options)
    params = SamplingParams(max_tokens=config.get("max_tokens", 1), temperature=0.0, ignore_eos=True,
                            detokenize=False, logprobs=1)
    reply({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "generate":
            started = time.perf_counter()
            # per-request connector settings, as a client sends them (e.g. LMCache's lmcache.skip_save)
            request_params = params if not cmd.get("kv_transfer_params") else params.clone()
            if request_params is not params:
                request_params.extra_args = {"kv_transfer_params": cmd["kv_transfer_params"]}
            (out,) = llm.generate([TokensPrompt(prompt_token_ids=cmd["tokens"])], request_params, use_tqdm=False)
            seconds = time.perf_counter() - started
            completion = out.outputs[0]
            logprobs = [step[token].logprob for step, token in zip(completion.logprobs or [], completion.token_ids)]
            reply({"cached": out.num_cached_tokens or 0, "tokens": list(completion.token_ids),
                   "logprobs": logprobs, "seconds": seconds})
        elif op == "reset":
            reply({"ok": bool(llm.reset_prefix_cache())})
        elif op == "stop":
            reply({"ok": True})
            return 0
        else:
            reply({"error": f"unknown op {op!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
