// Optimizer updates, one pass per (flat) parameter vector, as torch.optim; and the gradient's sum of
// squares for clipping and divergence checks (two fixed-order stages, deterministic).
#include "common.cuh"

// The updates compute in T with the NumPy reference's operations in its order (fastbp/backends/base.py):
// each constant (1 - beta1, lr / bias1, ...) is computed in double on the host or here and rounded to T
// once, as NumPy rounds a Python float, and every operation is an IEEE round-to-nearest one (*_rn, never
// fused), so the results equal the reference's bit for bit. A constant with a product in it is computed on
// the host: nvcc would fuse it here.
//
// guard is the array nonfinite_guard below trips: when it is tripped (guard[0] != 0), the update does
// nothing. The Trainer thus keeps a non-finite step out of the parameters without reading anything back
// to the host; it reads the guard every few steps.
template <typename T>
__global__ void sgd(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf, long long n, double lr,
                    double momentum, double dampening, int nesterov, double wd, int first,
                    const double* __restrict__ guard) {
    if (guard[0] != 0.0) {
        return;
    }
    const T lr_ = static_cast<T>(lr), mom = static_cast<T>(momentum), damp1 = static_cast<T>(1.0 - dampening),
            wd_ = static_cast<T>(wd);
    for (long long i = global_index(); i < n; i += grid_stride()) {
        T d = g[i];
        if (wd != 0.0) {
            d = add_rn(mul_rn(p[i], wd_), d);
        }
        if (momentum != 0.0) {
            T b;
            if (first) {
                b = d;
            } else if (dampening != 0.0) {
                b = add_rn(mul_rn(buf[i], mom), mul_rn(d, damp1));
            } else {
                b = add_rn(mul_rn(buf[i], mom), d);
            }
            buf[i] = b;
            d = nesterov ? add_rn(mul_rn(b, mom), d) : b;
        }
        p[i] = sub_rn(p[i], mul_rn(d, lr_));
    }
}

// shrink = 1 - lr * wd (AdamW's decay factor) comes from the host: computed here, nvcc would contract it into
// one FMA and round it differently from the reference for some (lr, wd) pairs.
template <typename T>
__global__ void adam(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v, long long n,
                     double lr, double beta1, double beta2, double eps, double bias1, double bias2_sqrt, double wd,
                     double shrink, int decoupled, const double* __restrict__ guard) {
    if (guard[0] != 0.0) {
        return;
    }
    const T b1 = static_cast<T>(beta1), omb1 = static_cast<T>(1.0 - beta1), b2 = static_cast<T>(beta2),
            omb2 = static_cast<T>(1.0 - beta2), bias2 = static_cast<T>(bias2_sqrt), eps_ = static_cast<T>(eps),
            step_size = static_cast<T>(lr / bias1), shrink_ = static_cast<T>(shrink), wd_ = static_cast<T>(wd);
    for (long long i = global_index(); i < n; i += grid_stride()) {
        T pi = p[i];
        T d = g[i];
        if (wd != 0.0) {
            if (decoupled) {
                pi = mul_rn(pi, shrink_);
            } else {
                d = add_rn(mul_rn(pi, wd_), d);
            }
        }
        const T mi = add_rn(mul_rn(m[i], b1), mul_rn(d, omb1));
        const T vi = add_rn(mul_rn(v[i], b2), mul_rn(mul_rn(d, d), omb2));
        m[i] = mi;
        v[i] = vi;
        // p -= m / (sqrt(v) / sqrt(bias2) + eps) * (lr / bias1)
        p[i] = sub_rn(pi, mul_rn(div_rn(mi, add_rn(div_rn(sqrt_rn(vi), bias2), eps_)), step_size));
    }
}

template <typename T>
__global__ void rmsprop(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ sq, T* __restrict__ buf,
                        long long n, double lr, double alpha, double eps, double momentum, double wd,
                        const double* __restrict__ guard) {
    if (guard[0] != 0.0) {
        return;
    }
    const T lr_ = static_cast<T>(lr), a = static_cast<T>(alpha), oma = static_cast<T>(1.0 - alpha),
            eps_ = static_cast<T>(eps), mom = static_cast<T>(momentum), wd_ = static_cast<T>(wd);
    for (long long i = global_index(); i < n; i += grid_stride()) {
        T d = g[i];
        if (wd != 0.0) {
            d = add_rn(mul_rn(p[i], wd_), d);
        }
        const T s = add_rn(mul_rn(sq[i], a), mul_rn(mul_rn(d, d), oma));
        sq[i] = s;
        T u = div_rn(d, add_rn(sqrt_rn(s), eps_));
        if (momentum != 0.0) {
            u = add_rn(mul_rn(buf[i], mom), u);
            buf[i] = u;
        }
        p[i] = sub_rn(p[i], mul_rn(u, lr_));
    }
}

// Stage one of sum(x^2): each of a fixed number of blocks sums its grid-stride share into partial[block].
template <typename T>
__global__ void sumsq_partial(const T* __restrict__ x, long long n, typename Acc<T>::type* __restrict__ partial) {
    using A = typename Acc<T>::type;
    __shared__ A shared[FASTBP_THREADS];
    A s = A(0);
    for (long long i = global_index(); i < n; i += grid_stride()) {
        const A xi = static_cast<A>(x[i]);
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
                                long long step) {
    if (blockIdx.x == 0 && threadIdx.x == 0 && guard[0] == 0.0) {
        const double l = static_cast<double>(loss[0]);
        const double s = static_cast<double>(sumsq[0]);
        if (!(isfinite(l) && isfinite(s))) {
            guard[0] = 1.0;
            guard[1] = static_cast<double>(step);
            guard[2] = l;
            guard[3] = s;
        }
    }
}

// Global-norm clipping on the device: x *= max_norm / (sqrt(sumsq) + 1e-6) when that is below 1 (as
// torch.nn.utils.clip_grad_norm_; the coefficient in double, rounded to T once, as on the host path);
// nothing when guard is tripped.
template <typename T>
__global__ void clip_by_norm(T* __restrict__ x, long long n, const T* __restrict__ sumsq, double max_norm,
                             const double* __restrict__ guard) {
    if (guard[0] != 0.0) {
        return;
    }
    const double coef = max_norm / (sqrt(static_cast<double>(sumsq[0])) + 1e-6);
    if (coef >= 1.0) {
        return;
    }
    const T c = static_cast<T>(coef);
    for (long long i = global_index(); i < n; i += grid_stride()) {
        x[i] = mul_rn(x[i], c);
    }
}
