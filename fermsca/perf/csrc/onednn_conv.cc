// oneDNN-backed 2-D convolutions exposed to XLA as FFI custom calls (CPU).
//
// Three handlers, batch-major activations and HWIO kernels as JAX lays them out (row-major NHWC /
// HWIO buffers). The two inputs of a call are both float32 or both bfloat16; the output is float32
// or, for bfloat16 inputs, either (oneDNN accumulates in float32 in every case):
//   fermsca_onednn_conv_fwd          x [N,H,W,C], w [KH,KW,C,O]   -> y  [N,OH,OW,O]
//   fermsca_onednn_conv_bwd_data     dy [N,OH,OW,O], w [KH,KW,C,O] -> dx [N,H,W,C]
//   fermsca_onednn_conv_bwd_weights  x [N,H,W,C], dy [N,OH,OW,O]  -> dw [KH,KW,C,O]
// Attributes: strides, dilation (JAX convention: 1 = dense), pad_lo, pad_hi (two entries each, H then
// W). Activations stay in the caller's NHWC layout; the kernel layout is left to oneDNN (the HWIO
// kernel / kernel gradient is reordered on every call; it is small).
//
// Primitives are built once per (kind, shapes, attributes) and cached; execution is thread-safe:
// each call brings its own scratchpad (user scratchpad mode) and the reorder buffers live in a
// per-thread workspace.

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

enum Kind : int64_t { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };
enum ElementType : int64_t { kF32 = 0, kBF16 = 1 };

// Everything that determines a primitive.
struct ConvGeom {
  int64_t n, c, h, w;      // input
  int64_t o, kh, kw;       // kernel (KH, KW, C, O)
  int64_t oh, ow;          // output spatial size
  int64_t sh, sw;          // strides
  int64_t dh, dw;          // dilation, JAX convention (1 = none)
  int64_t plh, plw, phh, phw;  // padding low/high
  int64_t type = kF32;      // element type of the two inputs
  int64_t out_type = kF32;  // element type of the output
};

using Key = std::array<int64_t, 20>;

Key MakeKey(Kind kind, const ConvGeom& g) {
  return Key{kind, g.n, g.c, g.h, g.w, g.o, g.kh, g.kw, g.oh, g.ow, g.sh,
             g.sw, g.dh, g.dw, g.plh, g.plw, g.phh, g.phw, g.type, g.out_type};
}

dt DataType(int64_t type) { return type == kBF16 ? dt::bf16 : dt::f32; }

struct KeyHash {
  size_t operator()(const Key& k) const {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : k) {
      h ^= static_cast<uint64_t>(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
      h *= 1099511628211ull;
    }
    return static_cast<size_t>(h);
  }
};

dnnl::engine& Engine() {
  static dnnl::engine* eng = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *eng;
}

constexpr size_t kAlign = 64;

size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// One operand of a plan: the caller's layout, the primitive's layout, and the reorder between them
// (user -> primitive for inputs, primitive -> user for the output) when they differ.
struct Operand {
  int arg = 0;
  memory::desc user;
  memory::desc prim;
  std::optional<dnnl::reorder> reorder;
  size_t staging_bytes = 0;  // 0 when no reorder is needed
};

struct Plan {
  dnnl::primitive prim;
  Operand in0, in1, out;
  size_t scratch_bytes = 0;  // the largest scratchpad among the primitive and its reorders
  std::string impl;
};

memory::desc ActDesc(int64_t n, int64_t c, int64_t h, int64_t w, dt type, tag t) {
  return memory::desc({n, c, h, w}, type, t);
}

memory::desc WeiDesc(const ConvGeom& g, dt type, tag t) {
  return memory::desc({g.o, g.c, g.kh, g.kw}, type, t);
}

dnnl::primitive_attr UserScratchAttr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

void FinishOperand(Operand& op, int arg, const memory::desc& user, const memory::desc& prim,
                   bool is_output, size_t& scratch_bytes) {
  op.arg = arg;
  op.user = user;
  op.prim = prim;
  if (user != prim) {
    auto attr = UserScratchAttr();
    auto rpd = is_output ? dnnl::reorder::primitive_desc(Engine(), prim, Engine(), user, attr)
                         : dnnl::reorder::primitive_desc(Engine(), user, Engine(), prim, attr);
    op.reorder = dnnl::reorder(rpd);
    op.staging_bytes = AlignUp(prim.get_size());
    scratch_bytes = std::max(scratch_bytes, rpd.scratchpad_desc().get_size());
  }
}

std::unique_ptr<Plan> BuildPlan(Kind kind, const ConvGeom& g) {
  const memory::dims strides{g.sh, g.sw};
  const memory::dims dilates{g.dh - 1, g.dw - 1};  // oneDNN counts the gaps
  const memory::dims pad_l{g.plh, g.plw};
  const memory::dims pad_r{g.phh, g.phw};

  // The call's output is the forward's dst, backward-data's diff_src or backward-weights'
  // diff_weights; the forward hint of the backward primitives takes the same types.
  const dt in = DataType(g.type), out = DataType(g.out_type);
  const dt x_type = kind == kBwdData ? out : in;
  const dt w_type = kind == kBwdWeights ? out : in;
  const dt y_type = kind == kFwd ? out : in;
  const memory::desc x_user = ActDesc(g.n, g.c, g.h, g.w, x_type, tag::nhwc);
  const memory::desc y_user = ActDesc(g.n, g.o, g.oh, g.ow, y_type, tag::nhwc);
  const memory::desc w_user = WeiDesc(g, w_type, tag::hwio);

  // oneDNN's choice of kernel layout; the HWIO kernel is reordered
  const memory::desc w_any = WeiDesc(g, w_type, tag::any);

  const auto attr = UserScratchAttr();
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd_pd(
      Engine(), dnnl::prop_kind::forward_training, algo, x_user, w_any, y_user, strides, dilates, pad_l,
      pad_r, attr);

  auto plan = std::make_unique<Plan>();
  size_t scratch = 0;
  if (kind == kFwd) {
    plan->prim = dnnl::convolution_forward(fwd_pd);
    scratch = fwd_pd.scratchpad_desc().get_size();
    plan->impl = fwd_pd.impl_info_str();
    FinishOperand(plan->in0, DNNL_ARG_SRC, x_user, fwd_pd.src_desc(), false, scratch);
    FinishOperand(plan->in1, DNNL_ARG_WEIGHTS, w_user, fwd_pd.weights_desc(), false, scratch);
    FinishOperand(plan->out, DNNL_ARG_DST, y_user, fwd_pd.dst_desc(), true, scratch);
  } else if (kind == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), algo, x_user, w_any, y_user, strides,
                                                       dilates, pad_l, pad_r, fwd_pd, attr);
    plan->prim = dnnl::convolution_backward_data(pd);
    scratch = pd.scratchpad_desc().get_size();
    plan->impl = pd.impl_info_str();
    FinishOperand(plan->in0, DNNL_ARG_DIFF_DST, y_user, pd.diff_dst_desc(), false, scratch);
    FinishOperand(plan->in1, DNNL_ARG_WEIGHTS, w_user, pd.weights_desc(), false, scratch);
    FinishOperand(plan->out, DNNL_ARG_DIFF_SRC, x_user, pd.diff_src_desc(), true, scratch);
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), algo, x_user, w_any, y_user, strides,
                                                          dilates, pad_l, pad_r, fwd_pd, attr);
    plan->prim = dnnl::convolution_backward_weights(pd);
    scratch = pd.scratchpad_desc().get_size();
    plan->impl = pd.impl_info_str();
    FinishOperand(plan->in0, DNNL_ARG_SRC, x_user, pd.src_desc(), false, scratch);
    FinishOperand(plan->in1, DNNL_ARG_DIFF_DST, y_user, pd.diff_dst_desc(), false, scratch);
    FinishOperand(plan->out, DNNL_ARG_DIFF_WEIGHTS, w_user, pd.diff_weights_desc(), true, scratch);
  }
  plan->scratch_bytes = AlignUp(scratch);
  return plan;
}

// Plans live for the life of the process (they are small; a model has a handful of shapes).
class PlanCache {
 public:
  const Plan& Get(Kind kind, const ConvGeom& g) {
    const Key key = MakeKey(kind, g);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = plans_.find(key);
      if (it != plans_.end()) return *it->second;
    }
    // Built outside the lock: primitive creation can take a while (JIT code generation). If two
    // threads race on the same key, the first insertion wins and the other plan is dropped.
    std::unique_ptr<Plan> plan = BuildPlan(kind, g);
    std::lock_guard<std::mutex> lock(mu_);
    auto [it, inserted] = plans_.emplace(key, std::move(plan));
    return *it->second;
  }

  size_t Size() {
    std::lock_guard<std::mutex> lock(mu_);
    return plans_.size();
  }

 private:
  std::mutex mu_;
  std::unordered_map<Key, std::unique_ptr<Plan>, KeyHash> plans_;
};

PlanCache& Cache() {
  static PlanCache* cache = new PlanCache();
  return *cache;
}

// Per-thread, grow-only, 64-byte aligned workspace for scratchpads and reorder staging.
class Workspace {
 public:
  uint8_t* Get(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      data_ = static_cast<uint8_t*>(std::aligned_alloc(kAlign, AlignUp(bytes)));
      if (data_ == nullptr) {
        size_ = 0;
        throw std::bad_alloc();
      }
      size_ = AlignUp(bytes);
    }
    return data_;
  }
  ~Workspace() { std::free(data_); }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// oneDNN parallelises every primitive over all cores. XLA may issue independent custom calls (the
// two backward convolutions, or one per simulated device) from different threads at once. An OpenMP
// build would then run one thread team per calling thread, side by side, and teams spinning at
// their barriers time-slice against each other; so with OpenMP, executions are serialised (a
// waiting call sleeps on a mutex). TBB builds share one pool of workers and run concurrent calls
// faster unserialised. FERMSCA_ONEDNN_SERIALIZE=1 / 0 overrides the choice.
bool SerializeExecution() {
  static const bool serialize = [] {
    const char* env = std::getenv("FERMSCA_ONEDNN_SERIALIZE");
    if (env != nullptr && env[0] != '\0') return std::string(env) != "0";
    return dnnl_version()->cpu_runtime == DNNL_RUNTIME_OMP;
  }();
  return serialize;
}

std::mutex& ExecMutex() {
  static std::mutex* mu = new std::mutex();
  return *mu;
}

void Execute(const Plan& plan, const void* in0, const void* in1, void* out) {
  std::unique_lock<std::mutex> exec_lock(ExecMutex(), std::defer_lock);
  if (SerializeExecution()) exec_lock.lock();
  thread_local Workspace workspace;
  thread_local dnnl::stream stream(Engine());

  const size_t total = plan.scratch_bytes + plan.in0.staging_bytes + plan.in1.staging_bytes +
                       plan.out.staging_bytes;
  uint8_t* base = total ? workspace.Get(total) : nullptr;
  uint8_t* scratch_ptr = base;
  uint8_t* cursor = base + plan.scratch_bytes;

  dnnl::memory scratch(
      memory::desc({static_cast<int64_t>(plan.scratch_bytes)}, dt::u8, tag::a), Engine(),
      plan.scratch_bytes ? scratch_ptr : nullptr);

  auto stage_input = [&](const Operand& op, const void* ptr) {
    dnnl::memory user(op.user, Engine(), const_cast<void*>(ptr));
    if (!op.reorder) return user;
    dnnl::memory staged(op.prim, Engine(), cursor);
    cursor += op.staging_bytes;
    op.reorder->execute(stream, {{DNNL_ARG_FROM, user},
                                 {DNNL_ARG_TO, staged},
                                 {DNNL_ARG_SCRATCHPAD, scratch}});
    return staged;
  };

  dnnl::memory m0 = stage_input(plan.in0, in0);
  dnnl::memory m1 = stage_input(plan.in1, in1);
  dnnl::memory out_user(plan.out.user, Engine(), out);
  dnnl::memory m_out = out_user;
  if (plan.out.reorder) {
    m_out = dnnl::memory(plan.out.prim, Engine(), cursor);
    cursor += plan.out.staging_bytes;
  }
  plan.prim.execute(stream, {{plan.in0.arg, m0},
                             {plan.in1.arg, m1},
                             {plan.out.arg, m_out},
                             {DNNL_ARG_SCRATCHPAD, scratch}});
  if (plan.out.reorder) {
    plan.out.reorder->execute(stream, {{DNNL_ARG_FROM, m_out},
                                       {DNNL_ARG_TO, out_user},
                                       {DNNL_ARG_SCRATCHPAD, scratch}});
  }
  stream.wait();
}

// Fills the attribute part of a geometry and checks it.
ffi::Error ReadAttrs(ConvGeom& g, ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                     ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  if (strides.size() != 2 || dilation.size() != 2 || pad_lo.size() != 2 || pad_hi.size() != 2) {
    return ffi::Error::InvalidArgument(
        "onednn_conv: strides, dilation, pad_lo and pad_hi must have two entries each");
  }
  g.sh = strides[0];
  g.sw = strides[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.plh = pad_lo[0];
  g.plw = pad_lo[1];
  g.phh = pad_hi[0];
  g.phw = pad_hi[1];
  if (g.sh < 1 || g.sw < 1 || g.dh < 1 || g.dw < 1) {
    return ffi::Error::InvalidArgument("onednn_conv: strides and dilation must be >= 1");
  }
  return ffi::Error::Success();
}

ffi::Error CheckOutputSize(const ConvGeom& g) {
  const int64_t eh = (g.kh - 1) * g.dh + 1;
  const int64_t ew = (g.kw - 1) * g.dw + 1;
  const int64_t oh = (g.h + g.plh + g.phh - eh) / g.sh + 1;
  const int64_t ow = (g.w + g.plw + g.phw - ew) / g.sw + 1;
  if (oh != g.oh || ow != g.ow) {
    return ffi::Error::InvalidArgument("onednn_conv: output size does not match the attributes");
  }
  return ffi::Error::Success();
}

template <typename Fn>
ffi::Error Guarded(Fn&& fn) {
  try {
    fn();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv: oneDNN error: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + e.what());
  }
  return ffi::Error::Success();
}

using Buf = ffi::AnyBuffer;
using Res = ffi::Result<ffi::AnyBuffer>;
using I64s = ffi::Span<const int64_t>;

std::optional<int64_t> TypeCode(ffi::DataType t) {
  if (t == ffi::DataType::F32) return kF32;
  if (t == ffi::DataType::BF16) return kBF16;
  return std::nullopt;
}

// The element types of a call (inputs alike; a float32 output, or bfloat16 for bfloat16 inputs).
ffi::Error ReadType(ConvGeom& g, const Buf& a, const Buf& b, Res& out) {
  const auto in = TypeCode(a.element_type()), result = TypeCode(out->element_type());
  if (!in || !result) {
    return ffi::Error::InvalidArgument("onednn_conv: only float32 and bfloat16 operands");
  }
  if (b.element_type() != a.element_type() || (*in == kF32 && *result != kF32)) {
    return ffi::Error::InvalidArgument(
        "onednn_conv: inputs of different element types, or a bfloat16 output of float32 inputs");
  }
  g.type = *in;
  g.out_type = *result;
  return ffi::Error::Success();
}

ffi::Error CheckRank4(const Buf& a, const Buf& b, Res& out) {
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 || out->dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("onednn_conv: operands must be rank 4");
  }
  return ffi::Error::Success();
}

ffi::Error ConvFwd(Buf x, Buf w, Res y, I64s strides, I64s dilation, I64s pad_lo, I64s pad_hi) {
  if (auto err = CheckRank4(x, w, y); err.failure()) return err;
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  ConvGeom g{xd[0], xd[3], xd[1], xd[2], wd[3], wd[0], wd[1], yd[1], yd[2]};
  if (auto err = ReadType(g, x, w, y); err.failure()) return err;
  if (auto err = ReadAttrs(g, strides, dilation, pad_lo, pad_hi); err.failure()) return err;
  if (wd[2] != g.c || yd[0] != g.n || yd[3] != g.o) {
    return ffi::Error::InvalidArgument("onednn_conv: inconsistent shapes (forward)");
  }
  if (auto err = CheckOutputSize(g); err.failure()) return err;
  return Guarded([&] { Execute(Cache().Get(kFwd, g), x.untyped_data(), w.untyped_data(),
                               y->untyped_data()); });
}

ffi::Error ConvBwdData(Buf dy, Buf w, Res dx, I64s strides, I64s dilation, I64s pad_lo,
                       I64s pad_hi) {
  if (auto err = CheckRank4(dy, w, dx); err.failure()) return err;
  auto yd = dy.dimensions(), wd = w.dimensions(), xd = dx->dimensions();
  ConvGeom g{xd[0], xd[3], xd[1], xd[2], wd[3], wd[0], wd[1], yd[1], yd[2]};
  if (auto err = ReadType(g, dy, w, dx); err.failure()) return err;
  if (auto err = ReadAttrs(g, strides, dilation, pad_lo, pad_hi); err.failure()) return err;
  if (wd[2] != g.c || yd[0] != g.n || yd[3] != g.o) {
    return ffi::Error::InvalidArgument("onednn_conv: inconsistent shapes (backward data)");
  }
  if (auto err = CheckOutputSize(g); err.failure()) return err;
  return Guarded([&] { Execute(Cache().Get(kBwdData, g), dy.untyped_data(), w.untyped_data(),
                               dx->untyped_data()); });
}

ffi::Error ConvBwdWeights(Buf x, Buf dy, Res dw, I64s strides, I64s dilation, I64s pad_lo,
                          I64s pad_hi) {
  if (auto err = CheckRank4(x, dy, dw); err.failure()) return err;
  auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  ConvGeom g{xd[0], xd[3], xd[1], xd[2], wd[3], wd[0], wd[1], yd[1], yd[2]};
  if (auto err = ReadType(g, x, dy, dw); err.failure()) return err;
  if (auto err = ReadAttrs(g, strides, dilation, pad_lo, pad_hi); err.failure()) return err;
  if (wd[2] != g.c || yd[0] != g.n || yd[3] != g.o) {
    return ffi::Error::InvalidArgument("onednn_conv: inconsistent shapes (backward weights)");
  }
  if (auto err = CheckOutputSize(g); err.failure()) return err;
  return Guarded([&] { Execute(Cache().Get(kBwdWeights, g), x.untyped_data(), dy.untyped_data(),
                               dw->untyped_data()); });
}

}  // namespace

#define FERMSCA_CONV_BINDING                \
  ffi::Ffi::Bind()                          \
      .Arg<Buf>()                           \
      .Arg<Buf>()                           \
      .Ret<Buf>()                           \
      .Attr<I64s>("strides")                \
      .Attr<I64s>("dilation")               \
      .Attr<I64s>("pad_lo")                 \
      .Attr<I64s>("pad_hi")

XLA_FFI_DEFINE_HANDLER_SYMBOL(fermsca_onednn_conv_fwd, ConvFwd, FERMSCA_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(fermsca_onednn_conv_bwd_data, ConvBwdData,
                              FERMSCA_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(fermsca_onednn_conv_bwd_weights, ConvBwdWeights,
                              FERMSCA_CONV_BINDING);

// Plain C helpers for diagnostics from Python (ctypes).
extern "C" {

// "major.minor.patch" of the oneDNN library actually loaded.
const char* fermsca_onednn_version() {
  static std::string s = [] {
    const dnnl_version_t* v = dnnl_version();
    return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
           std::to_string(v->patch) + " (" + v->hash + ")";
  }();
  return s.c_str();
}

// The implementation oneDNN picks for one convolution (e.g. "brg_conv_fwd:avx2"), written into
// `buf` (NUL-terminated, truncated to `len`). `geom` holds ConvGeom's 19 fields in order (the last
// two, the inputs' and the output's element types: 0 float32, 1 bfloat16). Returns 0 on success,
// -1 on error (message in buf).
int fermsca_onednn_impl_info(int64_t kind, const int64_t* geom, char* buf, int64_t len) {
  if (len <= 0) return -1;
  std::string out;
  int rc = 0;
  try {
    ConvGeom g{geom[0], geom[1], geom[2], geom[3], geom[4], geom[5], geom[6], geom[7], geom[8],
               geom[9], geom[10], geom[11], geom[12], geom[13], geom[14], geom[15], geom[16],
               geom[17], geom[18]};
    if (g.type != kF32 && g.type != kBF16) throw std::invalid_argument("bad element type");
    if (g.out_type != kF32 && g.out_type != g.type) throw std::invalid_argument("bad output type");
    if (kind < kFwd || kind > kBwdWeights) throw std::invalid_argument("bad kind");
    const Plan& plan = Cache().Get(static_cast<Kind>(kind), g);
    out = plan.impl;
    const char* names[3] = {"in0", "in1", "out"};
    const Operand* ops[3] = {&plan.in0, &plan.in1, &plan.out};
    for (int i = 0; i < 3; ++i) {
      if (ops[i]->reorder) out += std::string(" +reorder(") + names[i] + ")";
    }
  } catch (const std::exception& e) {
    out = e.what();
    rc = -1;
  }
  std::strncpy(buf, out.c_str(), static_cast<size_t>(len - 1));
  buf[len - 1] = '\0';
  return rc;
}

// Number of cached plans (tests use it to check that primitives are reused).
int64_t fermsca_onednn_cache_size() { return static_cast<int64_t>(Cache().Size()); }

}  // extern "C"
