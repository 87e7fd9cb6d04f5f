// Runs the plain-CUDA kernels of csrc/ on the host, so that their indexing, warp exchanges, tensor-core
// fragments, barriers and launch ordering are exercised on a machine without a GPU. Include this header
// first, then the .cu file under test (it defines FUSEDLORA_EMULATE, which routes the kernels' PTX-only
// points — the streaming load, the shared-table load, mma.sync, griddepcontrol.wait — and every launch
// here).
//
// Model, and what it checks:
// - A launch runs its blocks one after another, in a shuffled order. A block's threads are fibers that
//   switch only at collective points; between two of them the block's runnable threads run one at a
//   time in a shuffled order, so a missing __syncthreads shows up as a stale read. A fiber starts with
//   ucontext and switches with _setjmp/_longjmp (swapcontext makes a system call per switch to save the
//   signal mask: three quarters of the decode test's time went there, 94 s against 24 s).
// - __syncthreads waits for every thread of the block at the same call site; a thread that returned while
//   others wait there, or threads waiting at different barriers, are reported as errors.
// - Warp collectives (__shfl_sync, __shfl_xor_sync, mma.sync) need all 32 lanes of the warp at the same
//   call site with a full mask; divergence (some lanes elsewhere, or exited) is reported.
// - mma.sync.m16n8k16.row.col.f32.{bf16,f16}: fragments placed as the PTX ISA lays them out (g = lane / 4,
//   t = lane % 4; A rows g, g+8 and columns 2t, 2t+1, 2t+8, 2t+9; B rows 2t, 2t+1, 2t+8, 2t+9 of column g;
//   C rows g, g+8, columns 2t, 2t+1), products exact, each output's 16-term sum in double, added to C in
//   fp32. The hardware's internal rounding may differ from this by a few fp32 ulps.
// - Global loads made through __ldg and the streaming 16-byte load must lie inside one registered Buffer
//   and be aligned to their width. Buffers end on a PROT_NONE page, so any access past their end faults.
// - Programmatic dependent launch: a stream-ordered launch is held back until the next launch's threads
//   reach griddepcontrol.wait (or until the next stream-ordered launch, or synchronize()): the latest a GPU
//   may make its writes visible. A dependent kernel that reads them before waiting reads the poison the
//   caller put there.
// Not modelled: shared memory is ``static`` storage, so it starts each block holding the previous
// block's values rather than garbage; timing, occupancy and register limits.
#pragma once

#define FUSEDLORA_EMULATE 1
// a fortified longjmp refuses to jump to another stack, which is what a switch between fibers is
#undef _FORTIFY_SOURCE

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace fusedlora {
namespace emulate {

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "emulated CUDA: %s\n", what.c_str());
  std::exit(1);
}

// ---- global memory -------------------------------------------------------------------------------

struct Region {
  const char* begin;
  size_t bytes;
  std::string name;
};
inline std::vector<Region>& regions() {
  static std::vector<Region> r;
  return r;
}

// A device buffer: ``bytes`` bytes, 16-byte aligned, ending (up to that alignment) right before a
// PROT_NONE page. Registered for the checked loads while alive.
class Buffer {
 public:
  Buffer(size_t bytes, std::string name) : bytes_(bytes) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t span = (bytes + 15) / 16 * 16;
    map_bytes_ = (span + page - 1) / page * page + page;
    void* m = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("mmap failed for buffer " + name);
    map_ = static_cast<char*>(m);
    if (mprotect(map_ + map_bytes_ - page, page, PROT_NONE) != 0) fail("mprotect failed for buffer " + name);
    data_ = map_ + map_bytes_ - page - span;
    regions().push_back({data_, bytes, std::move(name)});
  }
  ~Buffer() {
    auto& r = regions();
    r.erase(std::remove_if(r.begin(), r.end(), [this](const Region& g) { return g.begin == data_; }), r.end());
    munmap(map_, map_bytes_);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_, map_bytes_;
  char* map_;
  char* data_;
};

template <typename T>
T load(const void* p) {
  const char* c = static_cast<const char*>(p);
  if (reinterpret_cast<uintptr_t>(c) % sizeof(T) != 0)
    fail("load of " + std::to_string(sizeof(T)) + " bytes from a misaligned address");
  for (const Region& r : regions())
    if (c >= r.begin && c + sizeof(T) <= r.begin + r.bytes) {
      T v;
      std::memcpy(&v, c, sizeof(T));
      return v;
    }
  for (const Region& r : regions())
    if (c + sizeof(T) > r.begin && c < r.begin + r.bytes + 64)
      fail("load of " + std::to_string(sizeof(T)) + " bytes at offset " + std::to_string(c - r.begin) +
           " of buffer " + r.name + " (" + std::to_string(r.bytes) + " bytes) is out of bounds");
  fail("load from an address outside every registered buffer");
}

// ---- threads, blocks, launches -------------------------------------------------------------------

enum class Operand { kBF16, kFP16 };

struct Thread {
  ucontext_t ctx;      // where the fiber starts
  std::jmp_buf resume;  // where it left off at its last collective point
  bool started = false;
  uint3 idx;
  int linear;
  enum State { kReady, kAtWarp, kAtBlock, kDone } state;
  const char* site = "";
  int line = 0;
  // The pending warp collective: a shuffle (value from lane src) or an mma (pointers to the fragments).
  enum Op { kShuffle, kMma } op;
  uint32_t value, result;
  int src;
  float* c;
  const uint32_t* a;
  const uint32_t* b;
  Operand operand;
};

constexpr size_t kStackBytes = 256 * 1024;

struct Grid {
  dim3 grid, block;
  uint3 block_idx;
  std::vector<Thread> threads;
  Thread* current = nullptr;
  std::jmp_buf scheduler;
  std::function<void()> body;
  std::vector<std::unique_ptr<char[]>> stacks;
};

struct State {
  std::vector<Grid*> active;  // nested when a held-back launch runs inside a waiting thread
  std::function<void()> held;  // the stream-ordered launch not yet run
  std::mt19937 rng{12345};
};
inline State& state() {
  static State s;
  return s;
}
inline Grid& grid() {
  if (state().active.empty()) fail("a CUDA built-in was used outside a kernel");
  return *state().active.back();
}
inline Thread& self() { return *grid().current; }

inline void fiber_entry() {
  Grid& g = grid();
  g.body();
  g.current->state = Thread::kDone;
  _longjmp(g.scheduler, 1);  // never returns: the stack is abandoned, and reused by the next block
}

// Leave the running thread at a collective point; resumes when the scheduler releases it.
inline void block_here(Thread::State s, const char* file, int line) {
  Thread& t = self();
  t.state = s;
  t.site = file;
  t.line = line;
  if (_setjmp(t.resume) == 0) _longjmp(grid().scheduler, 1);
}

inline std::string where(const Thread& t) { return std::string(t.site) + ":" + std::to_string(t.line); }

inline bool same_site(const Thread& a, const Thread& b) {
  return a.line == b.line && std::strcmp(a.site, b.site) == 0;
}

inline void mma_execute(Thread* lanes) {
  // Gather the 16x16 A, 16x8 B and 16x8 C tiles from the lanes' fragments, then scatter D back.
  double A[16][16], B[16][8];
  float C[16][8];
  const Operand op = lanes[0].operand;
  auto half_value = [op](uint32_t reg, int hi) {
    const uint16_t bits = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xFFFFu);
    if (op == Operand::kBF16) {
      __nv_bfloat16_raw raw;
      raw.x = bits;
      return static_cast<double>(__bfloat162float(__nv_bfloat16(raw)));
    }
    __half_raw raw;
    raw.x = bits;
    return static_cast<double>(__half2float(__half(raw)));
  };
  for (int lane = 0; lane < 32; ++lane) {
    const Thread& t = lanes[lane];
    if (t.operand != op) fail("mma.sync with different operand types across lanes at " + where(t));
    const int g = lane >> 2, q = lane & 3;
    for (int reg = 0; reg < 4; ++reg) {
      const int row = g + 8 * (reg & 1), col = 2 * q + 8 * (reg >> 1);
      A[row][col] = half_value(t.a[reg], 0);
      A[row][col + 1] = half_value(t.a[reg], 1);
    }
    for (int reg = 0; reg < 2; ++reg) {
      const int k = 2 * q + 8 * reg;
      B[k][g] = half_value(t.b[reg], 0);
      B[k + 1][g] = half_value(t.b[reg], 1);
    }
    for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * q + (i & 1)] = t.c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * q + (i & 1);
      double sum = 0.0;
      for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
      lanes[lane].c[i] = static_cast<float>(static_cast<double>(C[row][col]) + sum);
    }
  }
}

// Releases every warp whose 32 lanes wait at the same collective, or the block at a barrier; false when
// nothing could be released.
inline bool release(Grid& g) {
  bool released = false;
  const int n = static_cast<int>(g.threads.size());
  for (int w = 0; w < n / 32; ++w) {
    Thread* lanes = &g.threads[32 * w];
    int at_warp = 0;
    for (int l = 0; l < 32; ++l) at_warp += lanes[l].state == Thread::kAtWarp;
    if (at_warp < 32) continue;
    for (int l = 1; l < 32; ++l)
      if (!same_site(lanes[l], lanes[0]) || lanes[l].op != lanes[0].op)
        fail("warp " + std::to_string(w) + " diverged: lane 0 at " + where(lanes[0]) + ", lane " +
             std::to_string(l) + " at " + where(lanes[l]));
    if (lanes[0].op == Thread::kShuffle) {
      for (int l = 0; l < 32; ++l) lanes[l].result = lanes[lanes[l].src & 31].value;
    } else {
      mma_execute(lanes);
    }
    for (int l = 0; l < 32; ++l) lanes[l].state = Thread::kReady;
    released = true;
  }
  if (released) return true;
  int at_block = 0, done = 0;
  for (const Thread& t : g.threads) {
    at_block += t.state == Thread::kAtBlock;
    done += t.state == Thread::kDone;
  }
  if (at_block > 0 && at_block + done == n) {
    if (done > 0) fail("__syncthreads at " + where(g.threads[0]) + " with " + std::to_string(done) + " threads exited");
    for (const Thread& t : g.threads)
      if (!same_site(t, g.threads[0]))
        fail("threads of a block wait at different barriers: " + where(g.threads[0]) + " and " + where(t));
    for (Thread& t : g.threads) t.state = Thread::kReady;
    return true;
  }
  return false;
}

// Runs ``t`` until its next collective point or its end. A function of its own, so that no local of the
// scheduler's loop lives across the _setjmp.
[[gnu::noinline]] inline void run_until_blocked(Grid& g, Thread& t) {
  g.current = &t;
  if (_setjmp(g.scheduler) == 0) {  // back here when the thread reaches a collective point or ends
    if (!t.started) {
      t.started = true;
      setcontext(&t.ctx);
    }
    _longjmp(t.resume, 1);
  }
}

inline void run_block(Grid& g) {
  const int n = static_cast<int>(g.threads.size());
  for (int i = 0; i < n; ++i) {
    Thread& t = g.threads[i];
    t.linear = i;
    t.idx = make_uint3(i % g.block.x, (i / g.block.x) % g.block.y, i / (g.block.x * g.block.y));
    t.state = Thread::kReady;
    t.started = false;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = g.stacks[i].get();
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, fiber_entry, 0);
  }
  std::vector<int> order(n);
  for (;;) {
    order.clear();
    for (int i = 0; i < n; ++i)
      if (g.threads[i].state == Thread::kReady) order.push_back(i);
    if (order.empty()) {
      if (release(g)) continue;
      int done = 0;
      for (const Thread& t : g.threads) done += t.state == Thread::kDone;
      if (done == n) return;
      for (const Thread& t : g.threads)
        if (t.state != Thread::kDone)
          fail("deadlock: thread " + std::to_string(t.linear) + " waits at " + where(t) +
               " but its warp or block never gets there");
    }
    std::shuffle(order.begin(), order.end(), state().rng);
    for (int i : order) {
      run_until_blocked(g, g.threads[i]);
    }
  }
}

inline void run_grid(dim3 grid_dim, dim3 block_dim, std::function<void()> body) {
  const int n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  if (n < 1 || n > 1024 || n % 32 != 0)
    fail("block of " + std::to_string(n) + " threads (expected a multiple of 32, at most 1024)");
  if (grid_dim.x < 1 || grid_dim.y < 1 || grid_dim.z < 1 || grid_dim.y > 65535 || grid_dim.z > 65535)
    fail("invalid grid dimensions");
  auto g = std::make_unique<Grid>();
  g->grid = grid_dim;
  g->block = block_dim;
  g->body = std::move(body);
  g->threads.resize(n);
  for (int i = 0; i < n; ++i) g->stacks.emplace_back(new char[kStackBytes]);
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid_dim.z; ++z)
    for (unsigned y = 0; y < grid_dim.y; ++y)
      for (unsigned x = 0; x < grid_dim.x; ++x) blocks.push_back(make_uint3(x, y, z));
  std::shuffle(blocks.begin(), blocks.end(), state().rng);
  state().active.push_back(g.get());
  for (const uint3& b : blocks) {
    g->block_idx = b;
    run_block(*g);
  }
  state().active.pop_back();
}

// Runs the held-back stream-ordered launch, if any.
inline void flush() {
  if (!state().held) return;
  std::function<void()> job = std::move(state().held);
  state().held = nullptr;
  job();
}
inline void synchronize() { flush(); }
inline void wait_for_prerequisite() { flush(); }

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid_dim, dim3 block_dim, bool dependent, Args&&... args) {
  std::function<void()> job = [=]() {
    run_grid(grid_dim, block_dim, [=]() { kernel(args...); });
  };
  if (dependent) {
    job();    // starts before the held-back launch; griddepcontrol.wait runs that one
    flush();  // it completes anyway before anything after this kernel
  } else {
    flush();
    state().held = std::move(job);
  }
  return cudaSuccess;
}

// ---- built-ins ------------------------------------------------------------------------------------

inline int lane() { return self().linear & 31; }

inline void syncthreads(const char* file, int line) { block_here(Thread::kAtBlock, file, line); }

template <typename V>
V shuffle(unsigned mask, V v, int src, const char* file, int line) {
  static_assert(sizeof(V) == 4, "32-bit shuffles only");
  if (mask != 0xffffffffu) fail(std::string("shuffle with a partial mask at ") + file + ":" + std::to_string(line));
  Thread& t = self();
  std::memcpy(&t.value, &v, 4);
  t.src = src;
  t.op = Thread::kShuffle;
  block_here(Thread::kAtWarp, file, line);
  V r;
  std::memcpy(&r, &self().result, 4);
  return r;
}

inline void mma_m16n8k16(float c[4], const uint32_t a[4], const uint32_t b[2], Operand operand) {
  Thread& t = self();
  t.c = c;
  t.a = a;
  t.b = b;
  t.operand = operand;
  t.op = Thread::kMma;
  block_here(Thread::kAtWarp, __FILE__, __LINE__);
}

}  // namespace emulate
}  // namespace fusedlora

template <typename T>
T __ldg(const T* p) {
  return ::fusedlora::emulate::load<T>(p);
}
template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#define threadIdx (::fusedlora::emulate::self().idx)
#define blockIdx (::fusedlora::emulate::grid().block_idx)
#define blockDim (::fusedlora::emulate::grid().block)
#define gridDim (::fusedlora::emulate::grid().grid)
#define __syncthreads() ::fusedlora::emulate::syncthreads(__FILE__, __LINE__)
#define __shfl_sync(mask, v, src) ::fusedlora::emulate::shuffle(mask, v, src, __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, o) \
  ::fusedlora::emulate::shuffle(mask, v, ::fusedlora::emulate::lane() ^ (o), __FILE__, __LINE__)
