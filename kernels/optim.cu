// Optimizer updates, one pass per (flat) parameter vector, as torch.optim; and the gradient's sum of
// squares for clipping and divergence checks (two fixed-order stages, deterministic).
#include "common.cuh"

// The updates compute in T with the reference's operations in its order (the optimizers' update() in
// fastbp/optim.py): each constant (1 - beta1, lr / bias1, ...) is computed in double on the host or here and
// rounded to T once, as NumPy rounds a Python float, and every operation is an IEEE round-to-nearest one
// (*_rn, never fused), so the results equal the reference's bit for bit. Their hyperparameters come as one
// structure each (SgdArgs, AdamArgs, RmspropArgs: codes.cuh, generated from cuda_sources.UPDATE_ARGS);
// a constant with a product in it is computed on the host (nvcc would fuse it here).
//
// Mixed precision: T is the parameters' type (the float32 master weights), G the gradient's (bf16 or f16,
// or T itself); each update reads G, computes in T and, when copy is not null, also writes the updated
// parameters rounded to G into copy (the weights the next step's GEMMs read), in the same pass.
//
// Loss scaling (float16): the gradients come multiplied by the loss scale; unscale, when not null, points
// at 1 / that scale (a power of two, so unscaling is exact), which multiplies each gradient in T before
// anything else, as torch.cuda.amp.GradScaler.unscale_ does.
//
// guard is the array nonfinite_guard below trips: when it is tripped (guard[0] != 0), the update does
// nothing. The Trainer thus keeps a non-finite step out of the parameters without reading anything back
// to the host; it reads the guard every few steps.
//
// CUDA graphs: a captured launch keeps the arguments it was captured with, so a replayed step could not
// change its learning rate, Adam's bias corrections or SGD's first-step flag. Each update therefore also
// takes ``at``: when not null, the structure is read from device memory there (the Trainer's step graph
// writes each step's values into it before a replay), and the by-value one is ignored; nonfinite_guard's
// step number likewise (step_at).

// Gradient element i as an update reads it: loaded into T, times 1 / the loss scale when unscale is set.
template <typename T, typename G>
__device__ __forceinline__ T gradient(const G* __restrict__ g, long long i, const float* __restrict__ unscale) {
    const T d = static_cast<T>(load(g[i]));
    return unscale != nullptr ? mul_rn(d, static_cast<T>(unscale[0])) : d;
}

// The updated parameter i into p and, when copy is set (mixed precision), rounded into its compute copy.
template <typename T, typename G>
__device__ __forceinline__ void write_param(T* __restrict__ p, G* __restrict__ copy, long long i, T value) {
    p[i] = value;
    if (copy != nullptr) {
        copy[i] = store<G>(value);
    }
}

template <typename T, typename G>
__global__ void sgd(T* __restrict__ p, const G* __restrict__ g, T* __restrict__ buf, long long n, SgdArgs by_value,
                    const SgdArgs* __restrict__ at, const double* __restrict__ guard, G* __restrict__ copy,
                    const float* __restrict__ unscale) {
    if (guard[0] != 0.0) {
        return;
    }
    const SgdArgs a = at != nullptr ? *at : by_value;
    const T lr = static_cast<T>(a.lr), mom = static_cast<T>(a.momentum), damp1 = static_cast<T>(1.0 - a.dampening),
            wd = static_cast<T>(a.weight_decay);
    for (long long i = global_index(); i < n; i += grid_stride()) {
        T d = gradient<T>(g, i, unscale);
        if (a.weight_decay != 0.0) {
            d = add_rn(d, mul_rn(wd, p[i]));
        }
        if (a.momentum != 0.0) {
            // buf = buf * momentum + (1 - dampening) * d (the first step: buf = d)
            const T b = a.first ? d : add_rn(mul_rn(buf[i], mom), mul_rn(damp1, d));
            buf[i] = b;
            d = a.nesterov ? add_rn(d, mul_rn(mom, b)) : b;
        }
        write_param(p, copy, i, sub_rn(p[i], mul_rn(lr, d)));
    }
}

template <typename T, typename G>
__global__ void adam(T* __restrict__ p, const G* __restrict__ g, T* __restrict__ m, T* __restrict__ v, long long n,
                     AdamArgs by_value, const AdamArgs* __restrict__ at, const double* __restrict__ guard,
                     G* __restrict__ copy, const float* __restrict__ unscale) {
    if (guard[0] != 0.0) {
        return;
    }
    const AdamArgs a = at != nullptr ? *at : by_value;
    const T b1 = static_cast<T>(a.beta1), omb1 = static_cast<T>(1.0 - a.beta1), b2 = static_cast<T>(a.beta2),
            omb2 = static_cast<T>(1.0 - a.beta2), bias2 = static_cast<T>(a.bias2_sqrt), eps = static_cast<T>(a.eps),
            step_size = static_cast<T>(a.lr / a.bias1), shrink = static_cast<T>(a.shrink),
            wd = static_cast<T>(a.weight_decay);
    for (long long i = global_index(); i < n; i += grid_stride()) {
        T pi = p[i];
        T d = gradient<T>(g, i, unscale);
        if (a.weight_decay != 0.0) {
            if (a.decoupled) {
                pi = mul_rn(pi, shrink);
            } else {
                d = add_rn(d, mul_rn(wd, pi));
            }
        }
        const T mi = add_rn(mul_rn(m[i], b1), mul_rn(omb1, d));
        const T vi = add_rn(mul_rn(v[i], b2), mul_rn(omb2, mul_rn(d, d)));
        m[i] = mi;
        v[i] = vi;
        // p -= m / (sqrt(v) / sqrt(bias2) + eps) * (lr / bias1)
        write_param(p, copy, i, sub_rn(pi, mul_rn(div_rn(mi, add_rn(div_rn(sqrt_rn(vi), bias2), eps)), step_size)));
    }
}

template <typename T, typename G>
__global__ void rmsprop(T* __restrict__ p, const G* __restrict__ g, T* __restrict__ sq, T* __restrict__ buf,
                        long long n, RmspropArgs by_value, const RmspropArgs* __restrict__ at,
                        const double* __restrict__ guard, G* __restrict__ copy, const float* __restrict__ unscale) {
    if (guard[0] != 0.0) {
        return;
    }
    const RmspropArgs a = at != nullptr ? *at : by_value;
    const T lr = static_cast<T>(a.lr), alpha = static_cast<T>(a.alpha), oma = static_cast<T>(1.0 - a.alpha),
            eps = static_cast<T>(a.eps), mom = static_cast<T>(a.momentum), wd = static_cast<T>(a.weight_decay);
    for (long long i = global_index(); i < n; i += grid_stride()) {
        T d = gradient<T>(g, i, unscale);
        if (a.weight_decay != 0.0) {
            d = add_rn(d, mul_rn(wd, p[i]));
        }
        const T s = add_rn(mul_rn(sq[i], alpha), mul_rn(oma, mul_rn(d, d)));
        sq[i] = s;
        T u = div_rn(d, add_rn(sqrt_rn(s), eps));
        if (a.momentum != 0.0) {
            u = add_rn(mul_rn(buf[i], mom), u);
            buf[i] = u;
        }
        write_param(p, copy, i, sub_rn(p[i], mul_rn(lr, u)));
    }
}

// Stage one of sum(x^2): each of a fixed number of blocks sums its grid-stride share into partial[block].
template <typename T>
__global__ void sumsq_partial(const T* __restrict__ x, long long n, typename Acc<T>::type* __restrict__ partial) {
    using A = typename Acc<T>::type;
    __shared__ A shared[FASTBP_THREADS];
    A s = A(0);
    for (long long i = global_index(); i < n; i += grid_stride()) {
        const A xi = static_cast<A>(load(x[i]));
        s += xi * xi;
    }
    s = block_sum(s, shared);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = s;
    }
}

// The deferred non-finite check, one thread: unless guard is tripped already, trip it when the loss or the
// gradient's sum of squares is not finite, and record [1, step, loss, sum of squares].
template <typename T>
__global__ void nonfinite_guard(const T* __restrict__ loss, const T* __restrict__ sumsq, double* __restrict__ guard,
                                long long step, const long long* __restrict__ step_at) {
    if (blockIdx.x == 0 && threadIdx.x == 0 && guard[0] == 0.0) {
        const double l = static_cast<double>(loss[0]);
        const double s = static_cast<double>(sumsq[0]);
        if (!(isfinite(l) && isfinite(s))) {
            guard[0] = 1.0;
            guard[1] = static_cast<double>(step_at != nullptr ? *step_at : step);
            guard[2] = l;
            guard[3] = s;
        }
    }
}

// Global-norm clipping on the device: x *= max_norm / (sqrt(sumsq) + 1e-6) when that is below 1 (as
// torch.nn.utils.clip_grad_norm_; the coefficient in double, rounded to T once, as on the host path);
// nothing when guard is tripped.
template <typename T>
__global__ void clip_by_norm(T* __restrict__ x, long long n, const typename Acc<T>::type* __restrict__ sumsq,
                             double max_norm, const double* __restrict__ guard) {
    using C = typename Compute<T>::type;
    if (guard[0] != 0.0) {
        return;
    }
    const double coef = max_norm / (sqrt(static_cast<double>(sumsq[0])) + 1e-6);
    if (coef >= 1.0) {
        return;
    }
    const C c = static_cast<C>(coef);
    for (long long i = global_index(); i < n; i += grid_stride()) {
        x[i] = store<T>(mul_rn(load(x[i]), c));
    }
}

// Loss scaling, the scale applied: x *= state[0] (the loss scale, a power of two), on a gradient source
// (the output delta) in its 16-bit type, before the backward pass carries it down.
template <typename T>
__global__ void scale_by(T* __restrict__ x, long long n, const float* __restrict__ state) {
    const float s = state[0];
    for (long long i = global_index(); i < n; i += grid_stride()) {
        x[i] = store<T>(load(x[i]) * s);
    }
}

// Dynamic loss scaling, one thread, after the scaled gradient's sum of squares: state holds [scale,
// 1 / the scale this step used, the unscaled sum of squares, steps since the scale last changed, overflow
// steps skipped so far]. An overflow (a sum of squares that is not finite) halves the scale (backoff) and
// gates this step's update off through gate[0] (gate is also closed when guard, the non-finite guard, is
// tripped); growth_interval steps without one double it (growth), as torch.cuda.amp.GradScaler.
// A is the accumulators' type (float).
template <typename A>
__global__ void loss_scale_update(const A* __restrict__ sumsq, A* __restrict__ state,
                                  const double* __restrict__ guard, double* __restrict__ gate, A growth, A backoff,
                                  long long growth_interval) {
    if (blockIdx.x != 0 || threadIdx.x != 0) {
        return;
    }
    const A scale = state[0], inv = A(1) / scale;
    const A s = sumsq[0];
    const bool finite = isfinite(s);
    state[1] = inv;
    state[2] = finite ? s * inv * inv : s;
    gate[0] = (guard[0] != 0.0 || !finite) ? 1.0 : 0.0;
    if (guard[0] != 0.0) {
        return;  // a diverged step: the Trainer raises at its next read of the guard
    }
    if (!finite) {
        state[0] = scale * backoff;
        state[3] = A(0);
        state[4] += A(1);
    } else if (state[3] + A(1) >= static_cast<A>(growth_interval)) {
        state[0] = scale * growth;
        state[3] = A(0);
    } else {
        state[3] += A(1);
    }
}
