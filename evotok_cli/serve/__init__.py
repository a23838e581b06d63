"""`evotok serve`: an OpenAI-compatible HTTP server over the step engine (docs/serve.md).

One model, loaded once; one `BackgroundEngine` decodes the rows of every request together. The modules:
`schema` (request JSON -> checked fields, OpenAI error objects), `plan` (fields -> the decoder, prompts and
`GenerationRequest` that `evotok generate` would build), `sessions` (engine jobs -> asyncio), `stream`
(SSE chunks), `responses` (OpenAI response objects and logprobs), `tokenize` (vLLM's /tokenize and
/detokenize), `metrics`, `page` (GET /), `app` (routes), `server`
(socket, uvicorn, signals) and `cli` (the command).

Layer 6, apps: may import training, jobs, decoding, runtime, base and the other apps (never round a loop).
"""
