// A C ABI over ExecuTorch's C++ runtime, for flexsfl.edge_runtime.backends.executorch (ctypes).
//
// Why: the executorch wheel's only Python entry to its runtime (extension/pybindings/_C) links
// libtorch and takes torch tensors (~190 MB of RSS on a device that never uses torch). The wheel
// also ships the runtime itself as shared libraries that need only libc/libstdc++, with headers;
// this file is compiled against them on first use (see executorch.py) and loaded with ctypes.
//
// Kernels and backends register themselves from static initializers when their library is
// loaded: the shim links libexecutorch_kernels_optimized.so (ATen ops: optimized, falling back
// to portable) and libexecutorch_backend_xnnpack.so with --no-as-needed, since it calls nothing
// in them by name. Primitive ops are in libexecutorch.so.
//
// Contract: every function returns 0 / a non-null handle on success; on failure it returns -1 /
// NULL and fet_last_error() says why in one line (per thread). Tensors are dense and row-major
// (numpy C order); dtype codes are ExecuTorch's ScalarType (Long = 4, Float = 6). A method's
// outputs live in its planned memory until its next execute or release: copy them out
// (fet_output_copy) or into another method's inputs (fet_stage) before then. Free methods before
// their program.
//
// Memory: each method's planned memory is its own anonymous mapping. fet_method_release hands
// its pages back to the kernel (MADV_DONTNEED; they read as zeros when next touched): planned
// memory holds nothing a later execution reads without setting it first (inputs are set on every
// call; these programs have no mutable buffers), so a step never holds the forward's and the
// backward's arenas at once.

#include <executorch/extension/data_loader/mmap_data_loader.h>
#include <executorch/extension/memory_allocator/malloc_memory_allocator.h>
#include <executorch/runtime/core/error.h>
#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/executor/memory_manager.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

#include <sys/mman.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

// The wheel ships libexecutorch_threadpool.so but not threadpool.h: declare the two entries used.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::aten::TensorImpl;
using executorch::extension::MallocMemoryAllocator;
using executorch::extension::MmapDataLoader;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::MemoryManager;
using executorch::runtime::Method;
using executorch::runtime::MethodMeta;
using executorch::runtime::Program;
using executorch::runtime::Span;

constexpr int kMaxDim = 16;
thread_local char g_error[512] = "";

void set_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_error, sizeof g_error, fmt, ap);
  va_end(ap);
}

const char* err_name(Error e) {
  return executorch::runtime::to_string(e);
}

struct FetProgram {
  std::optional<MmapDataLoader> loader;
  std::optional<Program> program;
};

struct Mapping {
  void* p = MAP_FAILED;
  size_t size = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping(Mapping&& o) noexcept : p(o.p), size(o.size) { o.p = MAP_FAILED; }
  ~Mapping() {
    if (p != MAP_FAILED) munmap(p, size);
  }
};

struct FetMethod {
  std::string name;
  // Planned memory: one anonymous mapping per memory id (pages are touched as used).
  std::vector<Mapping> buffers;
  std::vector<Span<uint8_t>> spans;
  std::optional<HierarchicalAllocator> planned;
  MallocMemoryAllocator method_allocator;
  MallocMemoryAllocator temp_allocator;
  std::optional<MemoryManager> memory;
  std::optional<Method> method;
};

const EValue* output_value(FetMethod* m, int index) {
  if (index < 0 || static_cast<size_t>(index) >= m->method->outputs_size()) {
    set_error("method '%s' has no output %d", m->name.c_str(), index);
    return nullptr;
  }
  const EValue& v = m->method->get_output(static_cast<size_t>(index));
  if (!v.isTensor()) {
    set_error("output %d of method '%s' is not a tensor", index, m->name.c_str());
    return nullptr;
  }
  return &v;
}

size_t element_size(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return 4;
    case ScalarType::Long: return 8;
    case ScalarType::Int: return 4;
    case ScalarType::Double: return 8;
    case ScalarType::Bool: return 1;
    case ScalarType::Byte: return 1;
    case ScalarType::Char: return 1;
    case ScalarType::Short: return 2;
    case ScalarType::Half: return 2;
    case ScalarType::BFloat16: return 2;
    default: return 0;
  }
}

}  // namespace

extern "C" {

const char* fet_last_error() { return g_error; }

int fet_abi_version() { return 1; }

void fet_init() { executorch::runtime::runtime_init(); }

// Threads of the process-wide pool that runs XNNPACK's kernels.
int fet_set_threads(uint32_t n) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool == nullptr || !pool->_unsafe_reset_threadpool(n)) {
    set_error("cannot set ExecuTorch's thread pool to %u threads", n);
    return -1;
  }
  return 0;
}

// The program at `path`, memory-mapped (its constants are read in place; XNNPACK packs its own
// copies of the weights it runs), checked for internal consistency.
void* fet_program_open(const char* path) {
  auto prog = std::make_unique<FetProgram>();
  auto loader = MmapDataLoader::from(path, MmapDataLoader::MlockConfig::NoMlock);
  if (!loader.ok()) {
    set_error("cannot map the file (%s)", err_name(loader.error()));
    return nullptr;
  }
  prog->loader.emplace(std::move(loader.get()));
  auto program = Program::load(&*prog->loader, Program::Verification::InternalConsistency);
  if (!program.ok()) {
    set_error("not a valid ExecuTorch program (%s)", err_name(program.error()));
    return nullptr;
  }
  prog->program.emplace(std::move(program.get()));
  return prog.release();
}

void fet_program_close(void* handle) { delete static_cast<FetProgram*>(handle); }

// Method `name` of the program, with its planned memory allocated; NULL if it has no such method.
void* fet_method_load(void* program_handle, const char* name) {
  auto* prog = static_cast<FetProgram*>(program_handle);
  auto meta = prog->program->method_meta(name);
  if (!meta.ok()) {
    set_error("the program has no method '%s' (%s)", name, err_name(meta.error()));
    return nullptr;
  }
  auto m = std::make_unique<FetMethod>();
  m->name = name;
  m->buffers.reserve(meta->num_memory_planned_buffers());
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    const size_t size = static_cast<size_t>(meta->memory_planned_buffer_size(i).get());
    Mapping buf;
    buf.size = size ? size : 1;
    buf.p = mmap(nullptr, buf.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf.p == MAP_FAILED) {
      set_error("method '%s': cannot allocate its %zu-byte planned buffer", name, size);
      return nullptr;
    }
    m->spans.emplace_back(static_cast<uint8_t*>(buf.p), size);
    m->buffers.push_back(std::move(buf));
  }
  m->planned.emplace(Span<Span<uint8_t>>(m->spans.data(), m->spans.size()));
  m->memory.emplace(&m->method_allocator, &*m->planned, &m->temp_allocator);
  auto method = prog->program->load_method(name, &*m->memory);
  if (!method.ok()) {
    set_error("cannot load method '%s' (%s; a kernel or backend the program needs may be missing)", name,
              err_name(method.error()));
    return nullptr;
  }
  m->method.emplace(std::move(method.get()));
  return m.release();
}

void fet_method_free(void* handle) { delete static_cast<FetMethod*>(handle); }

// Bytes of planned memory (all buffers) the method maps.
size_t fet_method_planned_bytes(void* handle) {
  size_t n = 0;
  for (const auto& b : static_cast<FetMethod*>(handle)->buffers) n += b.size;
  return n;
}

// Give the method's planned memory back to the kernel; its outputs are gone after this.
int fet_method_release(void* handle) {
  auto* m = static_cast<FetMethod*>(handle);
  for (const auto& b : m->buffers) {
    if (madvise(b.p, b.size, MADV_DONTNEED) != 0) {
      set_error("method '%s': cannot release its planned memory", m->name.c_str());
      return -1;
    }
  }
  return 0;
}

int fet_method_num_inputs(void* handle) { return static_cast<int>(static_cast<FetMethod*>(handle)->method->inputs_size()); }

int fet_method_num_outputs(void* handle) {
  return static_cast<int>(static_cast<FetMethod*>(handle)->method->outputs_size());
}

// Input `index` from `data` (dtype, shape[ndim], dense row-major); the method copies it into
// its planned memory (or resizes to `shape` within the planned bounds).
int fet_method_set_input(void* handle, int index, int dtype, void* data, const int64_t* shape, int ndim) {
  auto* m = static_cast<FetMethod*>(handle);
  if (ndim < 0 || ndim > kMaxDim) {
    set_error("input %d has %d dimensions", index, ndim);
    return -1;
  }
  TensorImpl::SizesType sizes[kMaxDim];
  TensorImpl::DimOrderType dim_order[kMaxDim];
  TensorImpl::StridesType strides[kMaxDim];
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    sizes[d] = static_cast<TensorImpl::SizesType>(shape[d]);
    dim_order[d] = static_cast<TensorImpl::DimOrderType>(d);
    strides[d] = static_cast<TensorImpl::StridesType>(stride);
    stride *= shape[d];
  }
  TensorImpl impl(static_cast<ScalarType>(dtype), ndim, sizes, data, dim_order, strides);
  const Error e = m->method->set_input(EValue(Tensor(&impl)), static_cast<size_t>(index));
  if (e != Error::Ok) {
    set_error("method '%s' refused input %d (%s)", m->name.c_str(), index, err_name(e));
    return -1;
  }
  return 0;
}

// Input `dst_index` of method `dst` from output `src_output` of method `src` (copied into dst's
// planned memory), without a round trip through the caller.
int fet_stage(void* dst, int dst_index, void* src, int src_output) {
  auto* d = static_cast<FetMethod*>(dst);
  const EValue* v = output_value(static_cast<FetMethod*>(src), src_output);
  if (v == nullptr) return -1;
  const Error e = d->method->set_input(*v, static_cast<size_t>(dst_index));
  if (e != Error::Ok) {
    set_error("method '%s' refused input %d from '%s' output %d (%s)", d->name.c_str(), dst_index,
              static_cast<FetMethod*>(src)->name.c_str(), src_output, err_name(e));
    return -1;
  }
  return 0;
}

int fet_method_execute(void* handle) {
  auto* m = static_cast<FetMethod*>(handle);
  const Error e = m->method->execute();
  if (e != Error::Ok) {
    set_error("method '%s' failed (%s)", m->name.c_str(), err_name(e));
    return -1;
  }
  return 0;
}

// Output `index`'s dtype and shape (into shape[max_dim]); returns its number of dimensions.
int fet_output_shape(void* handle, int index, int* dtype, int64_t* shape, int max_dim) {
  auto* m = static_cast<FetMethod*>(handle);
  const EValue* v = output_value(m, index);
  if (v == nullptr) return -1;
  const Tensor t = v->toTensor();
  if (t.dim() > max_dim) {
    set_error("output %d of method '%s' has %zd dimensions", index, m->name.c_str(), (ssize_t)t.dim());
    return -1;
  }
  *dtype = static_cast<int>(t.scalar_type());
  for (ssize_t d = 0; d < t.dim(); ++d) shape[d] = t.size(d);
  return static_cast<int>(t.dim());
}

// Copy output `index` into `dst`, which holds exactly `nbytes` (the output's size).
int fet_output_copy(void* handle, int index, void* dst, size_t nbytes) {
  auto* m = static_cast<FetMethod*>(handle);
  const EValue* v = output_value(m, index);
  if (v == nullptr) return -1;
  const Tensor t = v->toTensor();
  if (t.nbytes() != nbytes || element_size(t.scalar_type()) == 0) {
    set_error("output %d of method '%s' holds %zu bytes, the caller's buffer %zu", index, m->name.c_str(),
              t.nbytes(), nbytes);
    return -1;
  }
  if (nbytes) std::memcpy(dst, t.const_data_ptr(), nbytes);
  return 0;
}

}  // extern "C"
