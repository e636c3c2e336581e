"""Recorded replies, shaped after the servers' own documentation and sources.

Ollama: docs/api.md. OpenAI-compatible: the OpenAI API reference, vLLM's serving code
(continuous usage, error objects), llama.cpp's server (``timings``, ``error:`` events).
TGI: docs/openapi.json and router/src/server.rs (timing headers, stream events).
"""

from __future__ import annotations

import json
from typing import Any


def body(obj: Any) -> bytes:
    """A JSON reply body."""
    return json.dumps(obj).encode()


def ndjson(*objs: Any) -> bytes:
    """An NDJSON stream."""
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def sse(*objs: Any, done: bool = True) -> bytes:
    """An SSE stream of ``data:`` events, ended by ``[DONE]`` when ``done``."""
    events = [b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs]
    if done:
        events.append(b"data: [DONE]\n\n")
    return b"".join(events)


# -- Ollama ------------------------------------------------------------------------------

OLLAMA_GENERATE: dict[str, Any] = {
    "model": "llama3.2",
    "created_at": "2023-08-04T19:22:45.499127Z",
    "response": "The sky is blue because it is the color of the sky.",
    "done": True,
    "context": [1, 2, 3],
    "total_duration": 5043500667,
    "load_duration": 5025959,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 325953000,
    "eval_count": 290,
    "eval_duration": 4709213000,
}

OLLAMA_GENERATE_SUFFIX: dict[str, Any] = {
    "model": "codellama:code",
    "created_at": "2024-07-22T20:47:51.147561Z",
    "response": "\n  if a == 0:\n    return b\n  else:\n    return compute_gcd(b % a, a)\n",
    "done": True,
    "done_reason": "stop",
    "context": [1, 2, 3],
    "total_duration": 1162761250,
    "load_duration": 6683708,
    "prompt_eval_count": 17,
    "prompt_eval_duration": 201222000,
    "eval_count": 63,
    "eval_duration": 953997000,
}

OLLAMA_GENERATE_STREAM: list[dict[str, Any]] = [
    {
        "model": "llama3.2",
        "created_at": "2023-08-04T08:52:19.385406455-07:00",
        "response": "The",
        "done": False,
    },
    {
        "model": "llama3.2",
        "created_at": "2023-08-04T08:52:19.585406455-07:00",
        "response": " sky 🦙 é",
        "done": False,
    },
    {
        "model": "llama3.2",
        "created_at": "2023-08-04T19:22:45.499127Z",
        "response": "",
        "done": True,
        "done_reason": "stop",
        "context": [1, 2, 3],
        "total_duration": 10706818083,
        "load_duration": 6338219291,
        "prompt_eval_count": 26,
        "prompt_eval_duration": 130079000,
        "eval_count": 259,
        "eval_duration": 4232710000,
    },
]

OLLAMA_CHAT_TOOLS: dict[str, Any] = {
    "model": "llama3.2",
    "created_at": "2024-07-22T20:33:28.123648Z",
    "message": {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "function": {
                    "name": "get_current_weather",
                    "arguments": {"format": "celsius", "location": "Paris, FR"},
                }
            }
        ],
    },
    "done_reason": "stop",
    "done": True,
    "total_duration": 885095291,
    "load_duration": 3753500,
    "prompt_eval_count": 122,
    "prompt_eval_duration": 328493000,
    "eval_count": 33,
    "eval_duration": 552222000,
}

OLLAMA_CHAT_THINKING: dict[str, Any] = {
    "model": "qwen3",
    "created_at": "2025-05-29T09:35:56.836222Z",
    "message": {
        "role": "assistant",
        "content": "The answer is 4.",
        "thinking": "2 + 2 is 4.",
    },
    "done_reason": "stop",
    "done": True,
    "total_duration": 1000,
    "load_duration": 10,
    "prompt_eval_count": 9,
    "prompt_eval_duration": 200,
    "eval_count": 7,
    "eval_duration": 700,
}

OLLAMA_CHAT_LOAD: dict[str, Any] = {
    "model": "llama3.2",
    "created_at": "2024-09-12T21:17:29.110811Z",
    "message": {"role": "assistant", "content": ""},
    "done_reason": "load",
    "done": True,
}

OLLAMA_CHAT_STREAM: list[dict[str, Any]] = [
    {
        "model": "llama3.2",
        "created_at": "2023-08-04T08:52:19.385406455-07:00",
        "message": {"role": "assistant", "content": "The", "images": None},
        "done": False,
    },
    {
        "model": "llama3.2",
        "created_at": "2023-08-04T08:52:19.485406455-07:00",
        "message": {"role": "assistant", "content": " ciel est bleu 🌍"},
        "done": False,
    },
    {
        "model": "llama3.2",
        "created_at": "2023-08-04T19:22:45.499127Z",
        "done": True,
        "total_duration": 4883583458,
        "load_duration": 1334875,
        "prompt_eval_count": 26,
        "prompt_eval_duration": 342546000,
        "eval_count": 282,
        "eval_duration": 4535599000,
    },
]

OLLAMA_EMBED: dict[str, Any] = {
    "model": "all-minilm",
    "embeddings": [
        [0.010071029, -0.0017594862, 0.05007221, 0.04692972, 0.054916814],
        [-0.0098027075, 0.06042469, 0.025257962, -0.006364387, 0.07272725],
    ],
    "total_duration": 14143917,
    "load_duration": 1019500,
    "prompt_eval_count": 8,
}

OLLAMA_TAGS: dict[str, Any] = {
    "models": [
        {
            "name": "codellama:13b",
            "modified_at": "2023-11-04T14:56:49.277302595-07:00",
            "size": 7365960935,
            "digest": "9f438cb9cd581fc025612d27f7c1a6669ff83a8bb0ed86c94fcf4c5440555697",
            "details": {
                "format": "gguf",
                "family": "llama",
                "families": None,
                "parameter_size": "13B",
                "quantization_level": "Q4_0",
            },
        },
        {
            "name": "llama3:latest",
            "modified_at": "2023-12-07T09:32:18.757212583-08:00",
            "size": 3825819519,
            "digest": "fe938a131f40e6f6d40083c9f0f430a515233eb2edaa6d72eb85c50d64f2300e",
            "details": {
                "format": "gguf",
                "family": "llama",
                "families": None,
                "parameter_size": "7B",
                "quantization_level": "Q4_0",
            },
        },
    ]
}

OLLAMA_PS: dict[str, Any] = {
    "models": [
        {
            "name": "mistral:latest",
            "model": "mistral:latest",
            "size": 5137025024,
            "digest": "2ae6f6dd7a3dd734790bbbf58b8909a606e0e7e97e94b7604e0aa7ae4490e6d8",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "7.2B",
                "quantization_level": "Q4_0",
            },
            "expires_at": "2024-06-04T14:38:31.83753-07:00",
            "size_vram": 5137025024,
        }
    ]
}

OLLAMA_SHOW: dict[str, Any] = {
    "modelfile": '# Modelfile generated by "ollama show"\nFROM llava\nPARAMETER num_ctx 4096',
    "parameters": 'num_keep                       24\nstop                           "<|eot_id|>"',
    "template": "{{ if .System }}<|start_header_id|>system<|end_header_id|>{{ end }}",
    "details": {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "8.0B",
        "quantization_level": "Q4_0",
    },
    "model_info": {
        "general.architecture": "llama",
        "general.file_type": 2,
        "general.parameter_count": 8030261248,
        "llama.context_length": 8192,
        "tokenizer.ggml.model": "gpt2",
    },
    "capabilities": ["completion", "tools"],
    "modified_at": "2025-01-01T00:00:00Z",
}

OLLAMA_NOT_FOUND: dict[str, Any] = {"error": "model 'llama3' not found, try pulling it first"}
OLLAMA_BUSY: dict[str, Any] = {
    "error": "server busy, please try again.  maximum pending requests exceeded"
}
OLLAMA_STREAM_ERROR: dict[str, Any] = {
    "error": "an error was encountered while running the model: unexpected EOF"
}

# -- OpenAI-compatible (vLLM, llama.cpp, SGLang) ----------------------------------------------

VLLM_MODEL = "meta-llama/Llama-3.2-3B-Instruct"

VLLM_CHAT: dict[str, Any] = {
    "id": "chatcmpl-9b5b6b5e1a8a4f6f9d0c",
    "object": "chat.completion",
    "created": 1718000000,
    "model": VLLM_MODEL,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I help you today?",
                "tool_calls": [],
                "reasoning_content": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }
    ],
    "usage": {
        "prompt_tokens": 12,
        "total_tokens": 21,
        "completion_tokens": 9,
        "prompt_tokens_details": None,
    },
    "prompt_logprobs": None,
}

OPENAI_CHAT_TOOL_CALL: dict[str, Any] = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion",
    "created": 1699896916,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc123",
                        "type": "function",
                        "function": {
                            "name": "get_current_weather",
                            "arguments": '{\n"location": "Boston, MA"\n}',
                        },
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99},
}

VLLM_CHAT_REASONING: dict[str, Any] = {
    "id": "chatcmpl-r1",
    "object": "chat.completion",
    "created": 1718000001,
    "model": "Qwen/Qwen3-0.6B",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "4", "reasoning": "2+2=4"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
}

LLAMACPP_CHAT: dict[str, Any] = {
    "choices": [
        {
            "finish_reason": "length",
            "index": 0,
            "message": {"role": "assistant", "content": "Once upon a time"},
        }
    ],
    "created": 1735000000,
    "model": "tiny-llama",
    "system_fingerprint": "b4400-abcdef",
    "object": "chat.completion",
    "usage": {"completion_tokens": 4, "prompt_tokens": 10, "total_tokens": 14},
    "id": "chatcmpl-llama",
    "timings": {
        "prompt_n": 10,
        "prompt_ms": 12.5,
        "prompt_per_token_ms": 1.25,
        "prompt_per_second": 800.0,
        "predicted_n": 4,
        "predicted_ms": 40.1234567,
        "predicted_per_token_ms": 10.03,
        "predicted_per_second": 99.7,
    },
}

VLLM_COMPLETION: dict[str, Any] = {
    "id": "cmpl-3f2a",
    "object": "text_completion",
    "created": 1718000002,
    "model": VLLM_MODEL,
    "choices": [
        {
            "index": 0,
            "text": " Paris, the city of light.",
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "prompt_logprobs": None,
        }
    ],
    "usage": {"prompt_tokens": 5, "total_tokens": 12, "completion_tokens": 7},
}

OPENAI_EMBEDDINGS: dict[str, Any] = {
    "object": "list",
    "data": [
        {"object": "embedding", "embedding": [0.5, -0.25, 1], "index": 1},
        {"object": "embedding", "embedding": [0.0023064255, -0.009327292, 0.015797347], "index": 0},
    ],
    "model": "intfloat/e5-small-v2",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}

VLLM_MODELS: dict[str, Any] = {
    "object": "list",
    "data": [
        {
            "id": VLLM_MODEL,
            "object": "model",
            "created": 1718000000,
            "owned_by": "vllm",
            "root": VLLM_MODEL,
            "parent": None,
            "max_model_len": 131072,
        }
    ],
}


def _vllm_chunk(delta: dict[str, Any], finish: str | None, completion: int | None) -> Any:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1718000000,
        "model": VLLM_MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if completion is not None:
        chunk["usage"] = {
            "prompt_tokens": 12,
            "total_tokens": 12 + completion,
            "completion_tokens": completion,
        }
    return chunk


#: vLLM with include_usage + continuous_usage_stats: cumulative usage on every chunk (the
#: second content chunk carries two tokens), then a usage-only chunk, then [DONE].
VLLM_CHAT_STREAM = sse(
    _vllm_chunk({"role": "assistant", "content": ""}, None, 0),
    _vllm_chunk({"content": "Hel"}, None, 1),
    _vllm_chunk({"content": "lo wörld 🦙"}, None, 3),
    _vllm_chunk({"content": "!"}, "stop", 4),
    {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1718000000,
        "model": VLLM_MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 12, "total_tokens": 16, "completion_tokens": 4},
    },
)


def _llamacpp_chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": 1735000000,
        "id": "chatcmpl-llama",
        "model": "tiny-llama",
        "system_fingerprint": "b4400-abcdef",
        "object": "chat.completion.chunk",
    }


#: llama.cpp: usage and timings only on the last chunk (which also has the finish reason).
LLAMACPP_CHAT_STREAM = sse(
    _llamacpp_chunk({"role": "assistant", "content": None}, None),
    _llamacpp_chunk({"content": "Once"}, None),
    _llamacpp_chunk({"content": " upon"}, None),
    {
        **_llamacpp_chunk({}, "length"),
        "usage": {"completion_tokens": 2, "prompt_tokens": 10, "total_tokens": 12},
        "timings": {"prompt_n": 10, "prompt_ms": 12.5, "predicted_n": 2, "predicted_ms": 20.0},
    },
)

#: llama.cpp's way to fail mid-stream: an ``error:`` field line.
LLAMACPP_ERROR_EVENT = (
    b'error: {"code":400,"message":"the request exceeds the available context size",'
    b'"type":"exceed_context_size_error"}\n\n'
)


def _completion_chunk(text: str, finish: str | None, completion: int) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1718000000,
        "model": VLLM_MODEL,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": 5,
            "total_tokens": 5 + completion,
            "completion_tokens": completion,
        },
    }


VLLM_COMPLETION_STREAM = sse(
    _completion_chunk(" Paris", None, 1),
    _completion_chunk(",", None, 2),
    _completion_chunk(" France", "length", 3),
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1718000000,
        "model": VLLM_MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 5, "total_tokens": 8, "completion_tokens": 3},
    },
)

VLLM_ERROR: dict[str, Any] = {
    "object": "error",
    "message": "The model `llama3` does not exist.",
    "type": "NotFoundError",
    "param": None,
    "code": 404,
}
VLLM_STREAM_ERROR: dict[str, Any] = {
    "error": {
        "message": "Request timed out in the engine.",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
}
OPENAI_ERROR: dict[str, Any] = {
    "error": {
        "message": "Incorrect API key provided: sk-abc.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}
FASTAPI_422: dict[str, Any] = {
    "detail": [
        {"type": "missing", "loc": ["body", "messages"], "msg": "Field required", "input": {}},
        {"type": "float_type", "loc": ["body", "temperature"], "msg": "Input should be a number"},
    ]
}

# -- TGI ---------------------------------------------------------------------------------

TGI_MODEL = "bigscience/bloom-560m"

TGI_INFO: dict[str, Any] = {
    "model_id": TGI_MODEL,
    "model_sha": "e985a63cdc139290c5f700ff1929f0b5942cced2",
    "model_dtype": "torch.float16",
    "model_device_type": "cuda",
    "model_pipeline_tag": "text-generation",
    "max_concurrent_requests": 128,
    "max_best_of": 2,
    "max_stop_sequences": 4,
    "max_input_tokens": 1024,
    "max_total_tokens": 2048,
    "validation_workers": 2,
    "max_client_batch_size": 32,
    "router": "text-generation-router",
    "version": "2.4.1",
    "sha": None,
    "docker_label": None,
}

TGI_GENERATE: dict[str, Any] = {
    "generated_text": " Rayleigh scattering",
    "details": {
        "finish_reason": "eos_token",
        "generated_tokens": 3,
        "seed": None,
        "prefill": [],
        "tokens": [
            {"id": 9, "text": " Ray", "logprob": -0.34, "special": False},
            {"id": 10, "text": "leigh scattering", "logprob": -0.2, "special": False},
            {"id": 2, "text": "</s>", "logprob": -0.01, "special": True},
        ],
    },
}

TGI_GENERATE_HEADERS: dict[str, Any] = {
    "content-type": "application/json",
    "x-compute-type": "1-nvidia-a10g",
    "x-compute-time": "0.412345",
    "x-compute-characters": "20",
    "x-total-time": "412",
    "x-validation-time": "1",
    "x-queue-time": "3",
    "x-inference-time": "408",
    "x-time-per-token": "136",
    "x-prompt-tokens": "7",
    "x-generated-tokens": "3",
    "x-model-id": TGI_MODEL,
}


def _tgi_event(index: int, text: str, *, special: bool = False) -> dict[str, Any]:
    return {
        "index": index,
        "token": {"id": 100 + index, "text": text, "logprob": -0.5, "special": special},
        "generated_text": None,
        "details": None,
    }


TGI_GENERATE_STREAM = sse(
    _tgi_event(1, " Ray"),
    _tgi_event(2, "leigh ñ"),
    {
        "index": 3,
        "token": {"id": 2, "text": "</s>", "logprob": -0.01, "special": True},
        "top_tokens": None,
        "generated_text": " Rayleigh ñ",
        "details": {
            "finish_reason": "eos_token",
            "generated_tokens": 3,
            "seed": None,
            "input_length": 7,
        },
    },
    done=False,
)

TGI_CHAT: dict[str, Any] = {
    "object": "chat.completion",
    "id": "",
    "created": 1730000000,
    "model": "HuggingFaceH4/zephyr-7b-beta",
    "system_fingerprint": "2.4.1-native",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Deep learning is..."},
            "logprobs": None,
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 15, "completion_tokens": 20, "total_tokens": 35},
}


def _tgi_chat_chunk(content: str, finish: str | None) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "id": "",
        "created": 1730000000,
        "model": "HuggingFaceH4/zephyr-7b-beta",
        "system_fingerprint": "2.4.1-native",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": None,
    }


TGI_CHAT_STREAM = sse(
    _tgi_chat_chunk("Deep", None),
    _tgi_chat_chunk(" learning", None),
    {
        **_tgi_chat_chunk("", "eos_token"),
        "usage": {"prompt_tokens": 15, "completion_tokens": 3, "total_tokens": 18},
    },
)

TGI_OVERLOADED: dict[str, Any] = {"error": "Model is overloaded", "error_type": "overloaded"}
TGI_VALIDATION: dict[str, Any] = {
    "error": "Input validation error: `temperature` must be strictly positive",
    "error_type": "validation",
}
TGI_STREAM_ERROR: dict[str, Any] = {
    "error": "Request failed during generation: CUDA OOM",
    "error_type": "generation",
}
