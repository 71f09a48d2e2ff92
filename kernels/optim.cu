// Optimizer updates, one pass per (flat) parameter vector, as torch.optim; and the gradient's sum of
// squares for clipping and divergence checks (two fixed-order stages, deterministic).
#include "common.cuh"

template <typename T>
__global__ void sgd(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf, long long n, double lr,
                    double momentum, double dampening, int nesterov, double wd, int first) {
    using A = typename Acc<T>::type;
    for (long long i = global_index(); i < n; i += grid_stride()) {
        A d = static_cast<A>(g[i]);
        if (wd != 0.0) {
            d += static_cast<A>(wd) * static_cast<A>(p[i]);
        }
        if (momentum != 0.0) {
            const A b = first ? d : static_cast<A>(momentum) * static_cast<A>(buf[i])
                                        + static_cast<A>(1.0 - dampening) * d;
            buf[i] = static_cast<T>(b);
            d = nesterov ? d + static_cast<A>(momentum) * b : b;
        }
        p[i] = static_cast<T>(static_cast<A>(p[i]) - static_cast<A>(lr) * d);
    }
}

template <typename T>
__global__ void adam(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v, long long n,
                     double lr, double beta1, double beta2, double eps, double bias1, double bias2_sqrt, double wd,
                     int decoupled) {
    using A = typename Acc<T>::type;
    const A step_size = static_cast<A>(lr / bias1);
    const A shrink = static_cast<A>(1.0 - lr * wd);
    for (long long i = global_index(); i < n; i += grid_stride()) {
        A pi = static_cast<A>(p[i]);
        A d = static_cast<A>(g[i]);
        if (decoupled) {
            pi *= shrink;
        } else if (wd != 0.0) {
            d += static_cast<A>(wd) * pi;
        }
        const A mi = static_cast<A>(beta1) * static_cast<A>(m[i]) + static_cast<A>(1.0 - beta1) * d;
        const A vi = static_cast<A>(beta2) * static_cast<A>(v[i]) + static_cast<A>(1.0 - beta2) * d * d;
        m[i] = static_cast<T>(mi);
        v[i] = static_cast<T>(vi);
        p[i] = static_cast<T>(pi - step_size * mi / (m_sqrt(vi) / static_cast<A>(bias2_sqrt) + static_cast<A>(eps)));
    }
}

template <typename T>
__global__ void rmsprop(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ sq, T* __restrict__ buf,
                        long long n, double lr, double alpha, double eps, double momentum, double wd) {
    using A = typename Acc<T>::type;
    for (long long i = global_index(); i < n; i += grid_stride()) {
        A d = static_cast<A>(g[i]);
        if (wd != 0.0) {
            d += static_cast<A>(wd) * static_cast<A>(p[i]);
        }
        const A s = static_cast<A>(alpha) * static_cast<A>(sq[i]) + static_cast<A>(1.0 - alpha) * d * d;
        sq[i] = static_cast<T>(s);
        A u = d / (m_sqrt(s) + static_cast<A>(eps));
        if (momentum != 0.0) {
            u = static_cast<A>(momentum) * static_cast<A>(buf[i]) + u;
            buf[i] = static_cast<T>(u);
        }
        p[i] = static_cast<T>(static_cast<A>(p[i]) - static_cast<A>(lr) * u);
    }
}

// Stage one of sum(x^2): each of a fixed number of blocks sums its grid-stride share into partial[block].
template <typename T>
__global__ void sumsq_partial(const T* __restrict__ x, long long n, typename Acc<T>::type* __restrict__ partial) {
    using A = typename Acc<T>::type;
    __shared__ A shared[256];
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

template <typename T>
__global__ void scale(T* __restrict__ x, long long n, double alpha) {
    using A = typename Acc<T>::type;
    for (long long i = global_index(); i < n; i += grid_stride()) {
        x[i] = static_cast<T>(static_cast<A>(x[i]) * static_cast<A>(alpha));
    }
}
