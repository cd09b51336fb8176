#!/usr/bin/env python3
"""Writes a tiny llama-architecture GGUF with random weights, for testing against a real
llama-server without downloading any weights.

The model is nonsense (its weights are random), but llama-server loads it like any other: a
SentencePiece-style vocabulary with byte fallback (so any text tokenizes), the ChatML special
tokens, and a ChatML chat template in its metadata (so /v1/chat/completions works), and the
llama tensor layout. It answers only with words from a fixed list and never ends a turn by itself,
so max_tokens decides every answer's length. The weights come from a fixed seed, so the same
options write the same file.

    python make_gguf.py OUT.gguf            # n_embd 64, 2 layers: loads in ~20 ms
    python make_gguf.py --large OUT.gguf    # n_embd 512, 8 layers: slow enough to interrupt a stream

Needs the ``gguf`` package (pinned in requirements.txt) and numpy (its dependency).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

# The ChatML template, as chat models (Qwen and others) carry it in `tokenizer.chat_template`;
# like Qwen 3's, it reads `enable_thinking` (which an Ollama `think` becomes), here only to write
# forty words more into the prompt when thinking is turned off, so a test can see it arrive.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ 'no thinking here ' * 40 }}{% endif %}"
    "{% endif %}"
)

# The tool-calling variant's template: ChatML with tools in the Hermes style (as Qwen 2.5 writes
# them), so llama-server recognises the format, parses `<tool_call>` blocks into tool calls and
# constrains their arguments with a grammar from the tools' JSON schemas.
TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\n# Tools\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\n</tools>\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}{{- '<|im_start|>assistant\n' }}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '<tool_call>\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# The tool-calling variant's extra tokens, as Qwen 2.5 has them: llama-server's Hermes format
# keeps them whole ("preserved tokens").
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
# The residual-stream dimensions the tool-calling variant's weights reserve (see write()).
TOOL_CHANNELS = 4

# Whole-word pieces beside the byte tokens, so ordinary English prompts take a few tokens each
# rather than one per byte (the prompt-length tests count on it being short).
WORDS = (
    "the be to of and a in that have I it for not on with he as you do at this but his by from "
    "they we say her she or an will my one all would there their what so up out if about who get "
    "which go me when make can like time no just him know take people into year your good some "
    "could them see other than then now look only come its over think also back after use two how "
    "our work first well way even new want because any these give day most us is are was were "
    "hello world say test word model answer question reply short long yes please thanks"
).split()


# The vocabulary's last tokens: "▁" and each word after it, as SentencePiece spells them.
WORD_PIECES = ("\u2581",) + tuple("\u2581" + w for w in dict.fromkeys(WORDS))


@dataclass(frozen=True)
class Shape:
    """The model's dimensions."""

    n_embd: int
    n_layers: int
    n_heads: int
    n_ff: int
    n_ctx: int


SMALL = Shape(n_embd=64, n_layers=2, n_heads=4, n_ff=128, n_ctx=2048)
LARGE = Shape(n_embd=512, n_layers=8, n_heads=8, n_ff=1408, n_ctx=2048)
# The prefetch bench's model: about 340 MiB of f16 weights, so reading it from disk takes a while.
BENCH = Shape(n_embd=1536, n_layers=6, n_heads=12, n_ff=4096, n_ctx=2048)


def vocabulary(tool_calls: bool = False) -> Tuple[List[str], List[float], List[int]]:
    """Tokens, scores and types: <unk> <s> </s>, the ChatML markers, 256 byte tokens, words, and
    with ``tool_calls`` the tool-call opening last."""
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    pieces = list(WORD_PIECES)
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    # SentencePiece picks the highest-scoring segmentation: longer pieces score higher, so a word
    # is one token; control and byte tokens never win over a piece.
    scores = [0.0] * (len(tokens) - len(pieces)) + [float(len(p)) for p in pieces]
    if tool_calls:
        tokens += [TOOL_CALL_OPEN, TOOL_CALL_CLOSE]
        types += [TokenType.USER_DEFINED, TokenType.USER_DEFINED]
        scores += [0.0, 0.0]
    return tokens, scores, [int(t) for t in types]


def write(path: Path, shape: Shape, seed: int, tool_calls: bool = False) -> int:
    """Writes the GGUF to ``path``; returns the vocabulary size.

    ``tool_calls`` writes the tool-calling variant: a model that, after the newline that ends
    the generation prompt, opens a tool call ("<tool_call>", then a newline), and ends its turn
    after "</tool_call>". With tools in the request llama-server's grammar fills in the call (name
    and arguments from the schema) and parses it into ``tool_calls``, for tool_choice "required"
    and "auto" alike. Its weights make it a bigram model on a few channels of the residual stream
    that no layer writes to (dimensions 0 to 3): the output matrix reads them as "the current
    token is any / a newline / <tool_call> / </tool_call>" and favours the next token from that.
    """
    if shape.n_embd % shape.n_heads != 0:
        raise ValueError(f"n_embd {shape.n_embd} is not a multiple of n_heads {shape.n_heads}")
    tokens, scores, types = vocabulary(tool_calls)
    n_vocab = len(tokens)
    head_dim = shape.n_embd // shape.n_heads
    rng = np.random.default_rng(seed)
    # Matrices in f16 halve the large model's file; norms stay f32, as llama.cpp expects.
    matrix_dtype = np.float16 if shape.n_embd >= 256 else np.float32

    def matrix(rows: int, cols: int) -> np.ndarray:
        # numpy's shape is ggml's reversed: (out, in) for a weight that maps in -> out.
        return (rng.standard_normal((rows, cols)) * 0.02).astype(matrix_dtype)

    def output_matrix(rows: int, cols: int, first_word: int) -> np.ndarray:
        # Only word pieces can win: their rows are large, every other row (control, byte) is zero,
        # so the model never ends a turn by itself (a test decides the length with max_tokens) and
        # never emits a lone byte of a UTF-8 sequence (a chunk llama-server would hold back).
        out = np.zeros((rows, cols), dtype=matrix_dtype)
        out[first_word:] = rng.standard_normal((rows - first_word, cols)).astype(matrix_dtype)
        return out

    def without_bias_channel(weight: np.ndarray) -> np.ndarray:
        # A layer's output weight that leaves the tool-calling variant's channels alone.
        if tool_calls:
            weight[:TOOL_CHANNELS, :] = 0
        return weight

    def norm() -> np.ndarray:
        return np.ones(shape.n_embd, dtype=np.float32)

    writer = GGUFWriter(str(path), arch="llama")
    writer.add_name({SMALL: "vramgate-compat-tiny", LARGE: "vramgate-compat-large"}.get(shape, "vramgate-bench"))
    writer.add_file_type(LlamaFileType.MOSTLY_F16 if matrix_dtype == np.float16 else LlamaFileType.ALL_F32)
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    # The chat turn ends at <|im_end|>: a model that samples it stops, as a real ChatML model does.
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    # No "▁" before the first word of a text: llama-server tokenizes a chat's generation prompt
    # ("<|im_start|>assistant\n") on its own to start a JSON-schema grammar with it, and a space
    # prefix there makes the tokens disagree with the grammar ("Failed to initialize samplers").
    writer.add_add_space_prefix(False)
    writer.add_chat_template(TOOLS_TEMPLATE if tool_calls else CHATML_TEMPLATE)

    embeddings = matrix(n_vocab, shape.n_embd)
    newline = tokens.index("<0x0A>")
    if tool_calls:
        # The channels, in the residual stream as the embedding put them (no layer writes there),
        # large beside everything else so the final RMS norm keeps them at about sqrt(n_embd / 2).
        embeddings[:, :TOOL_CHANNELS] = 0
        embeddings[:, 0] = 1.0
        embeddings[newline, 1] = 1.0
        embeddings[tokens.index(TOOL_CALL_OPEN), 2] = 1.0
        embeddings[tokens.index(TOOL_CALL_CLOSE), 3] = 1.0
    writer.add_tensor("token_embd.weight", embeddings)
    for layer in range(shape.n_layers):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", norm())
        writer.add_tensor(f"{block}.attn_q.weight", matrix(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"{block}.attn_k.weight", matrix(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"{block}.attn_v.weight", matrix(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"{block}.attn_output.weight", without_bias_channel(matrix(shape.n_embd, shape.n_embd)))
        writer.add_tensor(f"{block}.ffn_norm.weight", norm())
        writer.add_tensor(f"{block}.ffn_gate.weight", matrix(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"{block}.ffn_up.weight", matrix(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"{block}.ffn_down.weight", without_bias_channel(matrix(shape.n_embd, shape.n_ff)))
    writer.add_tensor("output_norm.weight", norm())
    first_word = tokens.index(WORD_PIECES[0])
    output = output_matrix(n_vocab, shape.n_embd, first_word=first_word)
    if tool_calls:
        # Read from the channels (each about 5.6 where set): any token -> words (+1) and
        # </tool_call> (+2, so the grammar's closing is that token, not bytes); a newline ->
        # <tool_call> (+8); <tool_call> -> a newline (+8); </tool_call> -> <|im_end|> (+8). The gaps
        # are wide enough that sampling at any usual temperature picks the favoured token when the
        # grammar allows it.
        output[:, :TOOL_CHANNELS] = 0
        output[first_word : first_word + len(WORD_PIECES), 0] = 1.0
        output[tokens.index(TOOL_CALL_CLOSE)] = 0
        output[tokens.index(TOOL_CALL_CLOSE), 0] = 2.0
        output[tokens.index(TOOL_CALL_OPEN)] = 0
        output[tokens.index(TOOL_CALL_OPEN), 1] = 8.0
        output[newline, 2] = 8.0
        output[tokens.index("<|im_end|>"), 3] = 8.0
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return n_vocab


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="the GGUF file to write")
    parser.add_argument(
        "--large", action="store_true", help="n_embd 512 x 8 layers (slow to generate) instead of 64 x 2"
    )
    parser.add_argument(
        "--bench", action="store_true", help="n_embd 1536 x 6 layers, ~340 MiB (the prefetch bench's model)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument(
        "--tool-calls",
        action="store_true",
        help="the tool-calling variant: opens a tool call first, then ends its turn (see write())",
    )
    args = parser.parse_args(argv)
    shape = BENCH if args.bench else LARGE if args.large else SMALL
    try:
        n_vocab = write(args.out, shape, args.seed, tool_calls=args.tool_calls)
    except OSError as e:
        print(f"make_gguf.py: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.out}: llama, n_embd {shape.n_embd}, {shape.n_layers} layers, {n_vocab} tokens, "
        f"{args.out.stat().st_size} bytes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
