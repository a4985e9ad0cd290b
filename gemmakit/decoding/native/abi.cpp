// The layout of the structs Python fills through ctypes, as this compiler lays them out: gk_abi writes, for each
// struct, its size and then each field's offset, in declaration order. gemmakit/decoding/native/abi.py compares
// them with its ctypes mirrors when the library loads, so a struct edited on one side only is an error there,
// not memory corruption here.
#include <cstddef>

#include "common.h"

#define GK_FIELD(S, f) static_cast<int64_t>(offsetof(S, f))

extern "C" {

// Fills out[0 .. count) (count <= capacity) and returns count, or -1 if `capacity` is too small.
int64_t gk_abi(int64_t* out, int64_t capacity) {
  const int64_t layout[] = {
      static_cast<int64_t>(sizeof(GkMatrix)),
      GK_FIELD(GkMatrix, data), GK_FIELD(GkMatrix, scales), GK_FIELD(GkMatrix, type),
      static_cast<int64_t>(sizeof(GkLayer)),
      GK_FIELD(GkLayer, wq), GK_FIELD(GkLayer, wk), GK_FIELD(GkLayer, wv), GK_FIELD(GkLayer, wo),
      GK_FIELD(GkLayer, wg), GK_FIELD(GkLayer, wu), GK_FIELD(GkLayer, wd),
      GK_FIELD(GkLayer, input_norm), GK_FIELD(GkLayer, post_attn_norm), GK_FIELD(GkLayer, pre_ffw_norm),
      GK_FIELD(GkLayer, post_ffw_norm), GK_FIELD(GkLayer, q_norm), GK_FIELD(GkLayer, k_norm),
      GK_FIELD(GkLayer, keys), GK_FIELD(GkLayer, values), GK_FIELD(GkLayer, slots), GK_FIELD(GkLayer, sliding),
      static_cast<int64_t>(sizeof(GkModel)),
      GK_FIELD(GkModel, batch), GK_FIELD(GkModel, hidden), GK_FIELD(GkModel, heads), GK_FIELD(GkModel, kv_heads),
      GK_FIELD(GkModel, head_dim), GK_FIELD(GkModel, intermediate), GK_FIELD(GkModel, num_layers),
      GK_FIELD(GkModel, eps), GK_FIELD(GkModel, scale), GK_FIELD(GkModel, attn_softcap), GK_FIELD(GkModel, layers),
      GK_FIELD(GkModel, cos_local), GK_FIELD(GkModel, sin_local), GK_FIELD(GkModel, cos_global),
      GK_FIELD(GkModel, sin_global), GK_FIELD(GkModel, pad), GK_FIELD(GkModel, ring_times), GK_FIELD(GkModel, ring),
      GK_FIELD(GkModel, ring_stride), GK_FIELD(GkModel, embed_table), GK_FIELD(GkModel, embed_scales),
      GK_FIELD(GkModel, normaliser),
      static_cast<int64_t>(sizeof(GkHead)),
      GK_FIELD(GkHead, norm), GK_FIELD(GkHead, eps), GK_FIELD(GkHead, packed), GK_FIELD(GkHead, scales_zeros),
      GK_FIELD(GkHead, n), GK_FIELD(GkHead, k), GK_FIELD(GkHead, group), GK_FIELD(GkHead, table),
      GK_FIELD(GkHead, table_scale), GK_FIELD(GkHead, candidates), GK_FIELD(GkHead, ranker),
      GK_FIELD(GkHead, final_softcap),
  };
  const int64_t count = static_cast<int64_t>(sizeof(layout) / sizeof(layout[0]));
  if (count > capacity) return -1;
  for (int64_t i = 0; i < count; ++i) out[i] = layout[i];
  return count;
}

}  // extern "C"
