// Shared helpers of fastbp's CUDA kernels (CUDA C++17): accumulator types, indexing, activations and
// their derivatives, warp reductions. Included by dense.cu, loss.cu and optim.cu.
#pragma once

// The block sizes of the cupy backend's launches: fastbp/backends/cuda_sources.py (THREADS, REDUCE_THREADS)
// defines them ahead of every source it hands CuPy, and the kernels' shared arrays are sized from them. The
// defaults below only let a file compile on its own (nvcc kernels/dense.cu); a test keeps them equal.
#ifndef FASTBP_THREADS
#define FASTBP_THREADS 256
#endif
#ifndef FASTBP_REDUCE_THREADS
#define FASTBP_REDUCE_THREADS 1024
#endif

// 16-bit storage types for mixed precision, kept as their bits (no cuda_fp16.h / cuda_bf16.h: the same
// code builds under NVRTC, nvcc and the CPU emulator). No kernel computes in them: values are loaded into
// float (load), computed on, and stored rounded to nearest even (store), as NumPy and ml_dtypes convert.
// dtype_name is the NumPy dtype whose bits they are (the emulator checks arrays against it).
struct bf16 {
    unsigned short bits;
    static constexpr const char* dtype_name = "bfloat16";
};
struct f16 {
    unsigned short bits;
    static constexpr const char* dtype_name = "float16";
};

// Sums accumulate in float for float and 16-bit data and in double for double data.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// What a kernel computes in for data of type T: T itself, float for the 16-bit types.
template <typename T> struct Compute { using type = T; };
template <> struct Compute<bf16> { using type = float; };
template <> struct Compute<f16> { using type = float; };

__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ double load(double x) { return x; }
__device__ __forceinline__ float load(bf16 x) { return __uint_as_float(static_cast<unsigned>(x.bits) << 16); }
__device__ __forceinline__ float load(f16 x) {
    const unsigned h = x.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
        const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31) {  // infinity or NaN (the payload kept)
        return __uint_as_float(sign | 0x7f800000u | (man << 13));
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

template <typename T> __device__ __forceinline__ T store(typename Compute<T>::type v) { return v; }
template <> __device__ __forceinline__ bf16 store<bf16>(float v) {
    const unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: quiet, its sign kept
        return bf16{static_cast<unsigned short>((u >> 16) | 0x40u)};
    }
    return bf16{static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
template <> __device__ __forceinline__ f16 store<f16>(float v) {
    const unsigned u = __float_as_uint(v), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {  // NaN: quiet
        return f16{static_cast<unsigned short>(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};
    }
    if (a >= 0x477ff000u) {  // 65520 and above round to infinity
        return f16{static_cast<unsigned short>(sign | 0x7c00u)};
    }
    if (a < 0x38800000u) {  // below 2^-14: a subnormal (or zero), round(|v| * 2^24) to nearest even
        const float scaled = __uint_as_float(a) * 16777216.0f;  // exact: a power-of-two scale
        return f16{static_cast<unsigned short>(sign | static_cast<unsigned>(rintf(scaled)))};
    }
    // normal: rebias the exponent (127 - 15), round the 13 dropped bits to nearest even (a carry moves
    // into the exponent, as rounding up to the next binade must)
    return f16{static_cast<unsigned short>(sign | ((a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13))};
}

__device__ __forceinline__ long long global_index() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long grid_stride() {
    return static_cast<long long>(gridDim.x) * blockDim.x;
}

// Math overloads, so templates pick the float or double function explicitly.
__device__ __forceinline__ float m_exp(float x) { return expf(x); }
__device__ __forceinline__ double m_exp(double x) { return exp(x); }
__device__ __forceinline__ float m_log(float x) { return logf(x); }
__device__ __forceinline__ double m_log(double x) { return log(x); }
__device__ __forceinline__ float m_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double m_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float m_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double m_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float m_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double m_sqrt(double x) { return sqrt(x); }

// IEEE round-to-nearest arithmetic that the compiler never contracts into an FMA: the optimizer updates
// use these so that each operation rounds exactly as NumPy's does, and the results equal the NumPy
// reference bit for bit.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float x) { return __fsqrt_rn(x); }
__device__ __forceinline__ double sqrt_rn(double x) { return __dsqrt_rn(x); }

// The activation, loss and target codes, generated from fastbp's Python tables.
#include "codes.cuh"

template <typename T> __device__ __forceinline__ T sigmoid(T z) {
    if (z >= T(0)) {
        return T(1) / (T(1) + m_exp(-z));
    }
    const T e = m_exp(z);
    return e / (T(1) + e);
}

template <typename T> struct GeluConst {
    static constexpr T c = T(0.7978845608028654);  // sqrt(2 / pi)
    static constexpr T k = T(0.044715);
};

// g(z)
template <typename T, int ACT> __device__ __forceinline__ T act_forward(T z) {
    if constexpr (ACT == RELU) {
        return z > T(0) ? z : T(0);
    } else if constexpr (ACT == LEAKY_RELU) {
        return z > T(0) ? z : T(0.01) * z;
    } else if constexpr (ACT == SIGMOID) {
        return sigmoid(z);
    } else if constexpr (ACT == TANH) {
        return m_tanh(z);
    } else if constexpr (ACT == GELU) {
        const T u = GeluConst<T>::c * (z + GeluConst<T>::k * z * z * z);
        return T(0.5) * z * (T(1) + m_tanh(u));
    } else if constexpr (ACT == SILU) {
        return z * sigmoid(z);
    } else {
        return z;
    }
}

// g'(z), from what the forward pass kept: s = A for identity, relu, leaky_relu, sigmoid and tanh (A is
// written over Z), s = Z for gelu and silu.
template <typename T, int ACT> __device__ __forceinline__ T act_grad(T s) {
    if constexpr (ACT == RELU) {
        return s > T(0) ? T(1) : T(0);
    } else if constexpr (ACT == LEAKY_RELU) {
        return s > T(0) ? T(1) : T(0.01);
    } else if constexpr (ACT == SIGMOID) {
        return s * (T(1) - s);
    } else if constexpr (ACT == TANH) {
        return T(1) - s * s;
    } else if constexpr (ACT == GELU) {
        const T c = GeluConst<T>::c, k = GeluConst<T>::k;
        const T t = m_tanh(c * (s + k * s * s * s));
        return T(0.5) * (T(1) + t) + T(0.5) * s * (T(1) - t * t) * c * (T(1) + T(3) * k * s * s);
    } else if constexpr (ACT == SILU) {
        const T sg = sigmoid(s);
        return sg * (T(1) + s * (T(1) - sg));
    } else {
        return T(1);
    }
}

// Butterfly reductions over a full warp: every lane ends with the result, in a fixed order.
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}
template <typename A> __device__ __forceinline__ A warp_max(A v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const A other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = other > v ? other : v;
    }
    return v;
}

template <typename A> __device__ __forceinline__ A warp_min(A v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const A other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = other < v ? other : v;
    }
    return v;
}

// A quiet NaN of type T (what a row with an invalid label gets).
template <typename T> __device__ __forceinline__ T quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() {
    return __longlong_as_double(0x7ff8000000000000LL);
}
template <> __device__ __forceinline__ bf16 quiet_nan<bf16>() { return bf16{0x7fc0}; }
template <> __device__ __forceinline__ f16 quiet_nan<f16>() { return f16{0x7e00}; }

// Sum of one block's values (blockDim.x a power of two, at most 1024), in a fixed order; thread 0
// gets the result. ``shared`` holds blockDim.x values.
template <typename A> __device__ __forceinline__ A block_sum(A v, A* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            shared[threadIdx.x] += shared[threadIdx.x + stride];
        }
        __syncthreads();
    }
    return shared[0];
}
