// fastbp's CUDA emulator: the shim that lets CUDA C++ kernels compile as host C++20 and run on the CPU.
//
// Every CUDA thread of a block is a fiber with its own stack. A scheduler runs the block's fibers one at
// a time, each to its next synchronisation point (__syncthreads, a warp intrinsic, or its end), in a
// chosen order (forward, reverse or random), then resolves what they wait on centrally:
//   - a barrier opens only when every thread of the block waits at it, at the same call site;
//   - a warp intrinsic (__shfl_*_sync, __ballot_sync, __all/__any_sync, __syncwarp) resolves only when
//     every lane its mask names waits at the same intrinsic with the same mask.
// Anything else (a barrier after an early return or in divergent code, a mask naming an exited lane or
// a lane elsewhere, a shuffle reading a lane outside the mask) stops the launch with an error naming the
// block, the thread and the source line. __shared__ variables live in a per-block arena filled with 0xFF
// bytes (NaN for float and double) when the block starts, so reading one before writing it gives NaN.
// Blocks run one after another, in the same order as the threads.
//
// The Python side (fastbp/testing/cuda_emulator.py) rewrites each `__shared__` declaration into
// FBEMU_SHARED(...), inlines the source's includes, appends one extern "C" launcher per kernel
// instantiation, and compiles the lot with g++ into a shared library.
#pragma once

// The fast stack switch is x86-64 assembly; other CPUs (or -DFBEMU_UCONTEXT, which the tests use to run
// this path here) switch with ucontext, a syscall per switch and about ten times slower.
#if defined(__x86_64__) && !defined(FBEMU_UCONTEXT)
#define FBEMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif
#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#define FASTBP_CUDA_EMULATOR 1

// ---------------------------------------------------------------------------------------- keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __constant__ static
// The Python side rewrites every __shared__ declaration; one that reaches the compiler is a form it
// does not know, and fails here with this name in the message.
#define __shared__ FBEMU_UNSUPPORTED_SHARED_DECLARATION

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
    unsigned x, y, z;
};

// The launch in progress: set by the scheduler at every switch into a fiber. Plain globals (hidden in
// this library): launches into one library are serialised by its launch lock, and a fiber never moves
// between OS threads.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

namespace fbemu {

using Where = std::source_location;

enum class Op : int { None, Barrier, Shfl, ShflUp, ShflDown, ShflXor, Ballot, All, Any, SyncWarp };
enum class State : int { Runnable, Waiting, Done };
enum class BarrierKind : int { Plain, Count, And, Or };

inline const char* op_name(Op op) {
    switch (op) {
        case Op::Barrier: return "__syncthreads";
        case Op::Shfl: return "__shfl_sync";
        case Op::ShflUp: return "__shfl_up_sync";
        case Op::ShflDown: return "__shfl_down_sync";
        case Op::ShflXor: return "__shfl_xor_sync";
        case Op::Ballot: return "__ballot_sync";
        case Op::All: return "__all_sync";
        case Op::Any: return "__any_sync";
        case Op::SyncWarp: return "__syncwarp";
        default: return "(nothing)";
    }
}

inline std::string short_file(const char* path) {
    const char* slash = std::strrchr(path, '/');
    return slash ? slash + 1 : path;
}

inline std::string at(const Where& w) {
    return short_file(w.file_name()) + ":" + std::to_string(w.line());
}

struct Fiber {
    void* sp = nullptr;  // saved stack pointer while switched out
#if !defined(FBEMU_ASM_SWITCH)
    ucontext_t ctx;
#endif
    uint3 tid{};
    unsigned linear = 0;
    State state = State::Runnable;
    Op op = Op::None;
    unsigned mask = 0;
    std::uint64_t value = 0;  // the lane's operand bits (shuffles), predicate (votes, barrier variants)
    int operand = 0;          // srcLane, delta or laneMask
    int width = 32;
    BarrierKind barrier = BarrierKind::Plain;
    Where where{};
    std::uint64_t result = 0;
};

struct Slot {
    const void* key;
    void* base;  // the allocation
    void* ptr;   // what the kernel sees; at least kGuard poisoned bytes lie on each side of it
    std::size_t size;
    const char* name;
    Where where;
};

inline constexpr std::size_t kStaticSharedLimit = 48 * 1024;  // without the opt-in attribute
// Poisoned margins around each __shared__ array, checked when its block ends: at least kGuard bytes and at
// least the array's own size on each side, so even an overflow by a whole block (a launch wider than the
// array) lands in them and is reported, instead of corrupting the heap. Under ASan its redzones do the job.
#if defined(__SANITIZE_ADDRESS__)
inline constexpr std::size_t kGuard = 0;
#else
inline constexpr std::size_t kGuard = 64;
#endif

inline std::size_t guard_bytes(std::size_t size) { return kGuard == 0 ? 0 : std::max(kGuard, size); }

#if defined(__SANITIZE_ADDRESS__)
inline constexpr std::size_t kStackSize = 512 * 1024;
#else
inline constexpr std::size_t kStackSize = 128 * 1024;
#endif

// ---------------------------------------------------------------------------------------- the scheduler
struct Scheduler {
    std::vector<Fiber> fibers;
    void* sched_sp = nullptr;
#if !defined(FBEMU_ASM_SWITCH)
    ucontext_t sched_ctx;
#endif
    Fiber* current = nullptr;
    void (*body)(void*) = nullptr;
    void* body_ctx = nullptr;
    std::string error;  // set by a fiber or the scheduler: the launch stops
    unsigned n_done = 0, n_barrier = 0, n_warp = 0;  // fibers exited, at a barrier, at a warp request
    std::vector<Slot> slots;
    std::size_t static_shared = 0;
    void* dynamic_shared = nullptr;
    std::size_t dynamic_shared_size = 0;
    char* stacks = nullptr;
    std::size_t stacks_count = 0;
#if defined(__SANITIZE_ADDRESS__)
    void* fake_stack = nullptr;
    const void* sched_stack_bottom = nullptr;
    std::size_t sched_stack_size = 0;
#endif

    ~Scheduler() {
        if (stacks) munmap(stacks, stacks_count * kStackSize);
    }
};

inline Scheduler* g_sched = nullptr;
inline std::mutex g_launch_lock;

}  // namespace fbemu

#if defined(FBEMU_ASM_SWITCH)
// Switch stacks: save the callee-saved registers and the stack pointer of the running context in
// *save_sp, load those of the context at load_sp. A fresh fiber's stack holds zeroed registers and
// fbemu_fiber_entry as the return address.
extern "C" void fbemu_swap(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl fbemu_swap
    .hidden fbemu_swap
    .type fbemu_swap, @function
fbemu_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fbemu_swap, .-fbemu_swap
)");
#endif

namespace fbemu {

inline void set_thread(const Fiber& f) {
    threadIdx = f.tid;
}

// Scheduler -> fiber.
inline void resume(Scheduler& s, Fiber& f) {
    s.current = &f;
    set_thread(f);
#if defined(__SANITIZE_ADDRESS__)
    const std::size_t index = static_cast<std::size_t>(&f - s.fibers.data());
    __sanitizer_start_switch_fiber(&s.fake_stack, s.stacks + index * kStackSize, kStackSize);
#endif
#if defined(FBEMU_ASM_SWITCH)
    fbemu_swap(&s.sched_sp, f.sp);
#else
    swapcontext(&s.sched_ctx, &f.ctx);
#endif
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(s.fake_stack, nullptr, nullptr);
#endif
}

// Fiber -> scheduler (the fiber has set its state and request).
inline void yield_to_scheduler() {
    Scheduler& s = *g_sched;
    Fiber& f = *s.current;
#if defined(__SANITIZE_ADDRESS__)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(f.state == State::Done ? nullptr : &fake, s.sched_stack_bottom,
                                   s.sched_stack_size);
#endif
#if defined(FBEMU_ASM_SWITCH)
    fbemu_swap(&f.sp, s.sched_sp);
#else
    swapcontext(&f.ctx, &s.sched_ctx);
#endif
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline std::string thread_name(const Fiber& f) {
    return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
           std::to_string(blockIdx.z) + ") thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) +
           "," + std::to_string(f.tid.z) + ")";
}

// A fiber hit an error: record it (the first one wins) and leave for good; the launch stops.
[[noreturn]] inline void fault(const std::string& message, const Where& where) {
    Scheduler& s = *g_sched;
    Fiber& f = *s.current;
    if (s.error.empty()) {
        s.error = at(where) + ": " + thread_name(f) + ": " + message;
    }
    f.state = State::Done;
    ++s.n_done;
    yield_to_scheduler();
    __builtin_unreachable();
}

[[noreturn]] inline void fiber_entry() {
    Scheduler& s = *g_sched;
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(nullptr, &s.sched_stack_bottom, &s.sched_stack_size);
#endif
    s.body(s.body_ctx);
    s.current->state = State::Done;
    ++s.n_done;
    yield_to_scheduler();
    __builtin_unreachable();
}

#if !defined(FBEMU_ASM_SWITCH)
inline void fiber_entry_trampoline() { fiber_entry(); }
#endif

inline unsigned lane_of(const Fiber& f) { return f.linear % 32u; }

// Post a request and wait for the scheduler to resolve it.
inline std::uint64_t wait_for(Op op, unsigned mask, std::uint64_t value, int operand, int width, const Where& where,
                              BarrierKind barrier = BarrierKind::Plain) {
    Fiber& f = *g_sched->current;
    f.op = op;
    f.mask = mask;
    f.value = value;
    f.operand = operand;
    f.width = width;
    f.barrier = barrier;
    f.where = where;
    f.state = State::Waiting;
    ++(op == Op::Barrier ? g_sched->n_barrier : g_sched->n_warp);
    yield_to_scheduler();
    return f.result;
}

// ---------------------------------------------------------------------------------------- shared memory
inline void* shared_slot(const void* key, std::size_t size, std::size_t align, const char* name, const Where& where) {
    Scheduler& s = *g_sched;
    for (const Slot& slot : s.slots) {
        if (slot.key == key) return slot.ptr;
    }
    s.static_shared += size;
    if (s.static_shared > kStaticSharedLimit) {
        fault("static __shared__ memory over 48 KiB (" + std::to_string(s.static_shared) + " bytes, '" + name +
                  "' the last)",
              where);
    }
    const std::size_t alignment = std::max<std::size_t>(align, alignof(std::max_align_t));
    const std::size_t guard = (guard_bytes(size) + alignment - 1) / alignment * alignment;
    const std::size_t rounded = (size + 2 * guard + alignment - 1) / alignment * alignment;
    auto* base = static_cast<unsigned char*>(std::aligned_alloc(alignment, std::max(rounded, alignment)));
    std::memset(base, 0xFF, rounded);
    s.slots.push_back({key, base, base + guard, size, name, where});
    return base + guard;
}

// The bytes around a __shared__ slot must still be poison when its block ends.
inline bool margins_intact(const unsigned char* ptr, std::size_t size, std::size_t guard) {
    for (std::size_t i = 1; i <= guard; ++i) {
        if (ptr[-static_cast<std::ptrdiff_t>(i)] != 0xFF || ptr[size + i - 1] != 0xFF) return false;
    }
    return true;
}

template <typename T>
inline T* dynamic_shared(const Where& where = Where::current()) {
    Scheduler& s = *g_sched;
    if (s.dynamic_shared == nullptr) fault("extern __shared__ memory used but the launch gave shared_mem=0", where);
    return static_cast<T*>(s.dynamic_shared);
}

// ---------------------------------------------------------------------------------------- resolution
inline unsigned threads_in_block() { return blockDim.x * blockDim.y * blockDim.z; }

// Resolve every warp request whose mask is complete; returns how many lanes were released, or -1 after
// recording an error.
inline int resolve_warps(Scheduler& s) {
    const unsigned n = threads_in_block();
    int released = 0;
    for (unsigned base = 0; base < n; base += 32) {
        const unsigned lanes = std::min(32u, n - base);
        unsigned handled = 0;
        for (unsigned l = 0; l < lanes; ++l) {
            Fiber& lead = s.fibers[base + l];
            if (lead.state != State::Waiting || lead.op == Op::Barrier || (handled >> l & 1u)) continue;
            const unsigned mask = lead.mask;
            std::string problem;
            for (unsigned k = 0; k < 32 && problem.empty(); ++k) {
                if (!(mask >> k & 1u)) continue;
                if (k >= lanes) {
                    problem = "its mask names lane " + std::to_string(k) + ", which this block does not have";
                    break;
                }
                const Fiber& other = s.fibers[base + k];
                if (other.state == State::Done) {
                    problem = "its mask names lane " + std::to_string(k) + ", which has exited";
                } else if (other.op != lead.op || other.mask != mask) {
                    char buf[64];
                    std::snprintf(buf, sizeof buf, "0x%08x", other.mask);
                    problem = "lane " + std::to_string(k) + " of its mask waits at " + op_name(other.op) + " (" +
                              at(other.where) + ", mask " + buf + ") instead";
                }
            }
            if (!problem.empty()) {
                char buf[64];
                std::snprintf(buf, sizeof buf, "0x%08x", mask);
                s.error = at(lead.where) + ": " + thread_name(lead) + ": " + op_name(lead.op) + " with mask " + buf +
                          " cannot complete: " + problem;
                return -1;
            }
            // All lanes of the mask are here: compute each one's result.
            if (lead.width <= 0 || lead.width > 32 || (lead.width & (lead.width - 1)) != 0) {
                s.error = at(lead.where) + ": " + op_name(lead.op) + " width " + std::to_string(lead.width) +
                          " is not a power of two <= 32";
                return -1;
            }
            std::uint64_t votes = 0;
            unsigned count = 0;
            for (unsigned k = 0; k < 32; ++k) {
                if (mask >> k & 1u) {
                    votes |= (s.fibers[base + k].value != 0 ? 1ull : 0ull) << k;
                    ++count;
                }
            }
            for (unsigned k = 0; k < 32; ++k) {
                if (!(mask >> k & 1u)) continue;
                Fiber& f = s.fibers[base + k];
                const unsigned w = static_cast<unsigned>(f.width);
                const unsigned seg = k & ~(w - 1);
                unsigned src = k;
                switch (f.op) {
                    case Op::Shfl: src = seg + (static_cast<unsigned>(f.operand) & (w - 1)); break;
                    case Op::ShflUp: {
                        const int up = static_cast<int>(k) - f.operand;
                        src = up >= static_cast<int>(seg) ? static_cast<unsigned>(up) : k;
                        break;
                    }
                    case Op::ShflDown: {
                        const unsigned down = k + static_cast<unsigned>(f.operand);
                        src = down < seg + w ? down : k;
                        break;
                    }
                    case Op::ShflXor: {
                        const unsigned x = k ^ static_cast<unsigned>(f.operand);
                        src = x < seg + w ? x : k;
                        break;
                    }
                    default: break;
                }
                if (f.op == Op::Shfl || f.op == Op::ShflUp || f.op == Op::ShflDown || f.op == Op::ShflXor) {
                    if (src >= 32 || !(mask >> src & 1u)) {
                        s.error = at(f.where) + ": " + thread_name(f) + ": " + op_name(f.op) + " reads lane " +
                                  std::to_string(src) + ", which its mask does not name (undefined on a GPU)";
                        return -1;
                    }
                    f.result = s.fibers[base + src].value;
                } else if (f.op == Op::Ballot) {
                    f.result = votes;
                } else if (f.op == Op::All) {
                    f.result = std::popcount(static_cast<std::uint32_t>(votes)) == static_cast<int>(count);
                } else if (f.op == Op::Any) {
                    f.result = votes != 0;
                } else {
                    f.result = 0;
                }
                f.state = State::Runnable;
                f.op = Op::None;
                handled |= 1u << k;
                ++released;
                --s.n_warp;
            }
        }
    }
    return released;
}

// Open the block's barrier if every thread waits at it; returns false after recording an error.
inline bool same_site(const Where& a, const Where& b) {
    return a.line() == b.line() && (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

inline bool resolve_barrier(Scheduler& s) {
    const unsigned n = threads_in_block();
    if (s.n_barrier == n) {  // the common case: everyone is here; check the call site and the variant
        const Fiber& lead = s.fibers[0];
        std::uint64_t count = 0;
        bool uniform = true;
        for (unsigned i = 0; i < n && uniform; ++i) {
            const Fiber& f = s.fibers[i];
            uniform = same_site(f.where, lead.where) && f.barrier == lead.barrier;
            count += f.value != 0;
        }
        if (uniform) {
            for (unsigned i = 0; i < n; ++i) {
                Fiber& f = s.fibers[i];
                f.result = f.barrier == BarrierKind::Count ? count
                         : f.barrier == BarrierKind::And   ? std::uint64_t(count == n)
                         : f.barrier == BarrierKind::Or    ? std::uint64_t(count != 0)
                                                           : 0;
                f.state = State::Runnable;
                f.op = Op::None;
            }
            s.n_barrier = 0;
            return true;
        }
    }
    // Something is wrong: find what, for the message.
    const Fiber* first = nullptr;
    for (unsigned i = 0; i < n; ++i) {
        const Fiber& f = s.fibers[i];
        if (f.state == State::Waiting && f.op == Op::Barrier) {
            first = &f;
            break;
        }
    }
    if (first == nullptr) {
        s.error = "internal: no thread can run and none waits at a barrier";
        return false;
    }
    for (unsigned i = 0; i < n; ++i) {
        const Fiber& f = s.fibers[i];
        if (f.state == State::Done) {
            s.error = at(first->where) + ": " + thread_name(*first) + ": __syncthreads waits for " + thread_name(f) +
                      ", which has exited (a barrier after an early return, or in divergent code)";
            return false;
        }
        if (f.op != Op::Barrier) {
            s.error = at(first->where) + ": " + thread_name(*first) + ": __syncthreads while " + thread_name(f) +
                      " waits at " + op_name(f.op) + " (" + at(f.where) + ")";
            return false;
        }
        if (!same_site(f.where, first->where) || f.barrier != first->barrier) {
            s.error = at(first->where) + ": " + thread_name(*first) + ": divergent barriers: " + thread_name(f) +
                      " waits at the barrier of " + at(f.where);
            return false;
        }
    }
    s.error = "internal: a barrier could not be resolved";
    return false;
}

struct LaunchConfig {
    unsigned grid[3];
    unsigned block[3];
    std::uint64_t shared_mem;
    int order;  // 0 forward, 1 reverse, 2 random
    std::uint64_t seed;
};

inline void prepare_stacks(Scheduler& s, std::size_t count) {
    if (s.stacks_count >= count) return;
    if (s.stacks) munmap(s.stacks, s.stacks_count * kStackSize);
    void* mem = mmap(nullptr, count * kStackSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (mem == MAP_FAILED) {
        s.stacks = nullptr;
        s.stacks_count = 0;
        return;
    }
    s.stacks = static_cast<char*>(mem);
    s.stacks_count = count;
    const long page = sysconf(_SC_PAGESIZE);
    for (std::size_t i = 0; i < count; ++i) {
        mprotect(s.stacks + i * kStackSize, static_cast<std::size_t>(page), PROT_NONE);  // overflow guard
    }
}

inline void start_fiber(Scheduler& s, Fiber& f, std::size_t index) {
    char* bottom = s.stacks + index * kStackSize;
#if defined(__SANITIZE_ADDRESS__)
    // A finished fiber is abandoned inside its frames: clear the redzones they left on this stack.
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    __asan_unpoison_memory_region(bottom + page, kStackSize - page);
#endif
#if defined(FBEMU_ASM_SWITCH)
    // Stagger the stack tops so that the fibers' hot frames do not all fall in one cache set.
    const std::size_t stagger = (index * 7 % 61) * 64;
    auto top = reinterpret_cast<std::uintptr_t>(bottom + kStackSize - stagger) & ~std::uintptr_t{15};
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;  // where fiber_entry would return to: it never does
    *--sp = reinterpret_cast<void*>(&fiber_entry);
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp, rbx, r12-r15
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = bottom + sysconf(_SC_PAGESIZE);
    f.ctx.uc_stack.ss_size = kStackSize - sysconf(_SC_PAGESIZE);
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry_trampoline, 0);
#endif
    f.state = State::Runnable;
    f.op = Op::None;
}

// Run one block to completion; false after an error.
inline bool run_block(Scheduler& s, int order, std::mt19937_64& rng, std::vector<unsigned>& run) {
    const unsigned n = threads_in_block();
    for (unsigned i = 0; i < n; ++i) start_fiber(s, s.fibers[i], i);
    s.n_done = s.n_barrier = s.n_warp = 0;
    bool ok = true;
    while (ok) {
        // Run every runnable fiber to its next synchronisation point, in the chosen order.
        if (order == 2) {
            run.clear();
            for (unsigned i = 0; i < n; ++i) {
                if (s.fibers[i].state == State::Runnable) run.push_back(i);
            }
            std::shuffle(run.begin(), run.end(), rng);
            for (unsigned i : run) {
                resume(s, s.fibers[i]);
                if (!s.error.empty()) break;
            }
        } else {
            for (unsigned k = 0; k < n; ++k) {
                Fiber& f = s.fibers[order == 1 ? n - 1 - k : k];
                if (f.state != State::Runnable) continue;
                resume(s, f);
                if (!s.error.empty()) break;
            }
        }
        if (!s.error.empty()) {
            ok = false;
        } else if (s.n_done == n) {
            break;
        } else if (s.n_warp > 0) {
            const int released = resolve_warps(s);
            if (released <= 0) {
                if (released == 0) s.error = "internal: a warp request could not be resolved";
                ok = false;
            }
        } else {
            ok = resolve_barrier(s);
        }
    }
    for (Slot& slot : s.slots) {
        if (ok && !margins_intact(static_cast<unsigned char*>(slot.ptr), slot.size, guard_bytes(slot.size))) {
            s.error = at(slot.where) + ": __shared__ " + slot.name + " (" + std::to_string(slot.size) +
                      " bytes) was written out of bounds in block (" + std::to_string(blockIdx.x) + "," +
                      std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
            ok = false;
        }
        std::free(slot.base);
    }
    s.slots.clear();
    s.static_shared = 0;
    return ok;
}

inline bool check_config(const LaunchConfig& c, std::string& error) {
    const unsigned long long threads = 1ull * c.block[0] * c.block[1] * c.block[2];
    if (threads == 0 || c.grid[0] == 0 || c.grid[1] == 0 || c.grid[2] == 0) {
        error = "a launch needs at least one block and one thread in each dimension";
        return false;
    }
    if (threads > 1024 || c.block[0] > 1024 || c.block[1] > 1024 || c.block[2] > 64) {
        error = "block (" + std::to_string(c.block[0]) + "," + std::to_string(c.block[1]) + "," +
                std::to_string(c.block[2]) + ") exceeds the CUDA limits (1024 threads, z <= 64)";
        return false;
    }
    if (c.grid[0] > 2147483647u || c.grid[1] > 65535u || c.grid[2] > 65535u) {
        error = "grid exceeds the CUDA limits (x < 2^31, y and z <= 65535)";
        return false;
    }
    if (c.shared_mem > 227 * 1024) {
        error = "shared_mem " + std::to_string(c.shared_mem) + " exceeds what one block may have (227 KiB)";
        return false;
    }
    return true;
}

// Run the whole grid. Returns 0, or 1 with the error in err.
inline int run_grid(const char* kernel, const LaunchConfig& c, void (*body)(void*), void* ctx, char* err,
                    std::size_t errlen) {
    std::lock_guard<std::mutex> lock(g_launch_lock);
    static Scheduler scheduler;
    Scheduler& s = scheduler;
    std::string error;
    if (!check_config(c, error)) {
        std::snprintf(err, errlen, "%s: %s", kernel, error.c_str());
        return 1;
    }
    const unsigned n = c.block[0] * c.block[1] * c.block[2];
    prepare_stacks(s, n);
    if (s.stacks == nullptr) {
        std::snprintf(err, errlen, "%s: could not map fiber stacks", kernel);
        return 1;
    }
    s.fibers.assign(n, Fiber{});
    for (unsigned z = 0, i = 0; z < c.block[2]; ++z)
        for (unsigned y = 0; y < c.block[1]; ++y)
            for (unsigned x = 0; x < c.block[0]; ++x, ++i) {
                s.fibers[i].tid = {x, y, z};
                s.fibers[i].linear = i;
            }
    s.body = body;
    s.body_ctx = ctx;
    s.error.clear();
    std::vector<unsigned char> dyn(c.shared_mem);
    if (c.shared_mem) std::memset(dyn.data(), 0xFF, dyn.size());
    s.dynamic_shared = c.shared_mem ? dyn.data() : nullptr;
    s.dynamic_shared_size = c.shared_mem;
    g_sched = &s;
    gridDim = dim3(c.grid[0], c.grid[1], c.grid[2]);
    blockDim = dim3(c.block[0], c.block[1], c.block[2]);

    const unsigned long long blocks = 1ull * c.grid[0] * c.grid[1] * c.grid[2];
    std::vector<unsigned long long> block_order(blocks);
    for (unsigned long long b = 0; b < blocks; ++b) block_order[b] = b;
    std::mt19937_64 rng(c.seed);
    if (c.order == 1) std::reverse(block_order.begin(), block_order.end());
    if (c.order == 2) std::shuffle(block_order.begin(), block_order.end(), rng);
    bool ok = true;
    std::vector<unsigned> run;
    run.reserve(n);
    for (unsigned long long b : block_order) {
        blockIdx = {static_cast<unsigned>(b % c.grid[0]), static_cast<unsigned>(b / c.grid[0] % c.grid[1]),
                    static_cast<unsigned>(b / (1ull * c.grid[0] * c.grid[1]))};
        if (c.shared_mem) std::memset(dyn.data(), 0xFF, dyn.size());
        if (!run_block(s, c.order, rng, run)) {
            ok = false;
            break;
        }
    }
    g_sched = nullptr;
    if (!ok) {
        std::snprintf(err, errlen, "%s: %s", kernel, s.error.c_str());
        return 1;
    }
    return 0;
}

// ---------------------------------------------------------------------------------------- launchers
// Parameter type codes, for the Python side's check of each argument (as CuPy would marshal it).
template <typename T>
constexpr const char* scalar_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, bool>) return "b8";
    else if constexpr (std::is_same_v<U, float>) return "f32";
    else if constexpr (std::is_same_v<U, double>) return "f64";
    else if constexpr (requires { U::dtype_name; }) return U::dtype_name;  // a storage type: its NumPy dtype
    else if constexpr (std::is_integral_v<U> && std::is_signed_v<U>) {
        if constexpr (sizeof(U) == 1) return "i8";
        else if constexpr (sizeof(U) == 2) return "i16";
        else if constexpr (sizeof(U) == 4) return "i32";
        else return "i64";
    } else if constexpr (std::is_integral_v<U>) {
        if constexpr (sizeof(U) == 1) return "u8";
        else if constexpr (sizeof(U) == 2) return "u16";
        else if constexpr (sizeof(U) == 4) return "u32";
        else return "u64";
    } else return nullptr;
}

template <typename P>
std::string param_code() {
    if constexpr (std::is_pointer_v<P>) {
        using E = std::remove_pointer_t<P>;
        const char* code = scalar_code<E>();
        std::string out = "*";
        out += code ? code : ("v" + std::to_string(sizeof(std::conditional_t<std::is_void_v<E>, char, E>))).c_str();
        if (std::is_const_v<E>) out += "c";
        return out;
    } else {
        const char* code = scalar_code<P>();
        return code ? std::string(code) : "v" + std::to_string(sizeof(P));
    }
}

template <typename... P>
std::string signature(void (*)(P...)) {
    std::string out;
    ((out += (out.empty() ? "" : ","), out += param_code<P>()), ...);
    return out;
}

template <typename... P, std::size_t... I>
int launch_impl(void (*kernel)(P...), const char* name, const LaunchConfig* c, void** args, char* err,
                std::size_t errlen, std::index_sequence<I...>) {
    struct Call {
        void (*kernel)(P...);
        std::tuple<P...> values;
    } call{kernel, std::tuple<P...>{*static_cast<std::remove_reference_t<P>*>(args[I])...}};
    auto body = [](void* ctx) {
        Call& k = *static_cast<Call*>(ctx);
        std::apply(k.kernel, k.values);  // each fiber gets its own copy of the parameters
    };
    return run_grid(name, *c, body, &call, err, errlen);
}

template <typename... P>
int launch(void (*kernel)(P...), const char* name, const LaunchConfig* c, void** args, char* err, std::size_t errlen) {
    return launch_impl(kernel, name, c, args, err, errlen, std::index_sequence_for<P...>{});
}

// Arithmetic that the compiler can neither contract nor reorder: the barrier pins the rounded result.
template <typename T>
__forceinline__ T pin(T x) {
    asm("" : "+x"(x));
    return x;
}

}  // namespace fbemu

// ---------------------------------------------------------------------------------------- device API
#define FBEMU_WHERE ::fbemu::Where where = ::fbemu::Where::current()

inline void __syncthreads(FBEMU_WHERE) {
    fbemu::wait_for(fbemu::Op::Barrier, 0, 0, 0, 32, where);
}
inline int __syncthreads_count(int predicate, FBEMU_WHERE) {
    return static_cast<int>(fbemu::wait_for(fbemu::Op::Barrier, 0, predicate != 0, 0, 32, where, fbemu::BarrierKind::Count));
}
inline int __syncthreads_and(int predicate, FBEMU_WHERE) {
    return static_cast<int>(fbemu::wait_for(fbemu::Op::Barrier, 0, predicate != 0, 0, 32, where, fbemu::BarrierKind::And));
}
inline int __syncthreads_or(int predicate, FBEMU_WHERE) {
    return static_cast<int>(fbemu::wait_for(fbemu::Op::Barrier, 0, predicate != 0, 0, 32, where, fbemu::BarrierKind::Or));
}

namespace fbemu {
inline void check_own_lane(unsigned mask, const char* op, const Where& where) {
    const unsigned lane = lane_of(*g_sched->current);
    if (!(mask >> lane & 1u)) {
        char buf[96];
        std::snprintf(buf, sizeof buf, "%s with mask 0x%08x, which does not name the calling lane %u", op, mask, lane);
        fault(buf, where);
    }
}

template <typename T>
T shuffle(Op op, unsigned mask, T var, int operand, int width, const Where& where) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move at most 8 bytes");
    check_own_lane(mask, op_name(op), where);
    std::uint64_t bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    const std::uint64_t got = wait_for(op, mask, bits, operand, width, where);
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}
}  // namespace fbemu

template <typename T>
T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, FBEMU_WHERE) {
    return fbemu::shuffle(fbemu::Op::Shfl, mask, var, srcLane, width, where);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, FBEMU_WHERE) {
    return fbemu::shuffle(fbemu::Op::ShflUp, mask, var, static_cast<int>(delta), width, where);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, FBEMU_WHERE) {
    return fbemu::shuffle(fbemu::Op::ShflDown, mask, var, static_cast<int>(delta), width, where);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize, FBEMU_WHERE) {
    return fbemu::shuffle(fbemu::Op::ShflXor, mask, var, laneMask, width, where);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, FBEMU_WHERE) {
    fbemu::check_own_lane(mask, "__ballot_sync", where);
    return static_cast<unsigned>(fbemu::wait_for(fbemu::Op::Ballot, mask, predicate != 0, 0, 32, where));
}
inline int __all_sync(unsigned mask, int predicate, FBEMU_WHERE) {
    fbemu::check_own_lane(mask, "__all_sync", where);
    return static_cast<int>(fbemu::wait_for(fbemu::Op::All, mask, predicate != 0, 0, 32, where));
}
inline int __any_sync(unsigned mask, int predicate, FBEMU_WHERE) {
    fbemu::check_own_lane(mask, "__any_sync", where);
    return static_cast<int>(fbemu::wait_for(fbemu::Op::Any, mask, predicate != 0, 0, 32, where));
}
inline void __syncwarp(unsigned mask = 0xffffffffu, FBEMU_WHERE) {
    fbemu::check_own_lane(mask, "__syncwarp", where);
    fbemu::wait_for(fbemu::Op::SyncWarp, mask, 0, 0, 32, where);
}
inline unsigned __activemask() {  // the lanes of this warp that have not exited
    const fbemu::Scheduler& s = *fbemu::g_sched;
    const unsigned base = s.current->linear & ~31u;
    unsigned mask = 0;
    for (unsigned k = 0; k < 32 && base + k < s.fibers.size(); ++k) {
        if (s.fibers[base + k].state != fbemu::State::Done) mask |= 1u << k;
    }
    return mask;
}
[[noreturn]] inline void __trap(FBEMU_WHERE) { fbemu::fault("__trap()", where); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T> __forceinline__ T __ldg(const T* p) { return *p; }

// Atomics (blocks and threads run one at a time, but through atomic_ref all the same).
template <typename T> T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <typename T> T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <typename T> T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <typename T> T atomicCAS(T* p, T expected, T desired) {
    std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
    return expected;
}
template <typename T> T atomicMax(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {}
    return old;
}
template <typename T> T atomicMin(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {}
    return old;
}

// ---------------------------------------------------------------------------------------- math
using std::isfinite;
using std::isinf;
using std::isnan;

inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// Round-to-nearest intrinsics: one IEEE operation each, never contracted into an FMA.
inline float __fadd_rn(float a, float b) { return fbemu::pin(fbemu::pin(a) + fbemu::pin(b)); }
inline double __dadd_rn(double a, double b) { return fbemu::pin(fbemu::pin(a) + fbemu::pin(b)); }
inline float __fsub_rn(float a, float b) { return fbemu::pin(fbemu::pin(a) - fbemu::pin(b)); }
inline double __dsub_rn(double a, double b) { return fbemu::pin(fbemu::pin(a) - fbemu::pin(b)); }
inline float __fmul_rn(float a, float b) { return fbemu::pin(fbemu::pin(a) * fbemu::pin(b)); }
inline double __dmul_rn(double a, double b) { return fbemu::pin(fbemu::pin(a) * fbemu::pin(b)); }
inline float __fdiv_rn(float a, float b) { return fbemu::pin(fbemu::pin(a) / fbemu::pin(b)); }
inline double __ddiv_rn(double a, double b) { return fbemu::pin(fbemu::pin(a) / fbemu::pin(b)); }
inline float __fsqrt_rn(float x) { return fbemu::pin(std::sqrt(fbemu::pin(x))); }
inline double __dsqrt_rn(double x) { return fbemu::pin(std::sqrt(fbemu::pin(x))); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

// Reinterpreting bits.
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }

#define FBEMU_SHARED(NAME, DIMS, ALIGN, ...)                                                                  \
    static const char NAME##_fbemu_key = 0;                                                                  \
    using NAME##_fbemu_type = __VA_ARGS__ DIMS;                                                              \
    NAME##_fbemu_type& NAME = *static_cast<NAME##_fbemu_type*>(::fbemu::shared_slot(                         \
        &NAME##_fbemu_key, sizeof(NAME##_fbemu_type), std::max<std::size_t>(ALIGN, alignof(NAME##_fbemu_type)), \
        #NAME, ::fbemu::Where::current()))

#define FBEMU_EXTERN_SHARED(NAME, ...) __VA_ARGS__* NAME = ::fbemu::dynamic_shared<__VA_ARGS__>()
