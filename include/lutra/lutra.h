// lutra's plain-type API in one include: every header that holds no
// per-target code, layer by layer (docs/design.md explains the layers).
//
// Per-target kernels (kernels/*-inl.h, base/element-inl.h) are not included
// here: include them one by one after hwy/highway.h, once per target when
// compiling for dynamic dispatch (docs/design.md, "Choosing a dispatch mode").
#ifndef LUTRA_LUTRA_H_
#define LUTRA_LUTRA_H_

// base/: Status, element types, the thread pool.
#include "lutra/base/element.h"
#include "lutra/base/status.h"
#include "lutra/base/thread_pool.h"

// format/: weight layouts and files.
#include "lutra/format/ggml_types.h"
#include "lutra/format/gguf.h"
#include "lutra/format/gguf_writer.h"
#include "lutra/format/llama_model.h"
#include "lutra/format/lora.h"
#include "lutra/format/lora_file.h"
#include "lutra/format/lutra_file.h"
#include "lutra/format/mapped_file.h"
#include "lutra/format/palette.h"
#include "lutra/format/tokenizer.h"

// quantize/: calibration, palettizer, GPTQ, sensitivity, bit allocation,
// recovery adapters.
#include "lutra/quantize/calibration.h"
#include "lutra/quantize/gptq.h"
#include "lutra/quantize/kmeans_1d.h"
#include "lutra/quantize/mixed_bits.h"
#include "lutra/quantize/palettize.h"
#include "lutra/quantize/quality.h"
#include "lutra/quantize/recovery.h"
#include "lutra/quantize/sensitivity.h"
#include "lutra/quantize/svd.h"

// kernels/: the plain types the kernels take.
#include "lutra/kernels/kv_cache.h"
#include "lutra/kernels/matmul.h"

// runtime/: chat templates, adapter cache, sampling, speculative decoding.
#include "lutra/runtime/chat_template.h"
#include "lutra/runtime/lora_manager.h"
#include "lutra/runtime/sampling.h"
#include "lutra/runtime/speculative.h"

#endif  // LUTRA_LUTRA_H_
