// A stand-in for libcublas and libcublasLt, for testing fastbp's ctypes calls into them on the CPU
// (tests/test_cublas_ctypes.py). It implements the few functions fastbp/backends/_cublas.py calls, with
// the signatures of cublas_api.h and cublasLt.h (CUDA 13), on host memory: the emulated CuPy's device
// arrays are host arrays, so its "device pointers" can be read here. float and double only; every other
// type answers CUBLAS_STATUS_NOT_SUPPORTED (15). It checks what it can of its arguments (attribute sizes,
// matching layouts, the algorithm handed back) and answers CUBLAS_STATUS_INVALID_VALUE (7) otherwise.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kOk = 0, kInvalid = 7, kNotSupported = 15;
constexpr uint64_t kAlgoMark = 0x5eedf00dULL;

struct Handle {
    void* stream = nullptr;
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
};

struct Desc {
    int compute = 0, scale = 0;
    int32_t transa = 0, transb = 0;
    uint32_t epilogue = 1;
    void* bias = nullptr;
    void* aux = nullptr;
    int64_t aux_ld = 0;
};

struct Layout {
    int type = 0;
    uint64_t rows = 0, cols = 0;
    int64_t ld = 0;
};

// element (i, p) of op(X), X column-major with leading dimension ld
template <typename T>
T at(const T* X, int trans, int64_t i, int64_t p, int64_t ld) {
    return trans == 0 ? X[i + p * ld] : X[p + i * ld];
}

template <typename T>
T gelu(T z) {
    const T c = T(0.7978845608028654), k = T(0.044715);
    return T(0.5) * z * (T(1) + std::tanh(c * (z + k * z * z * z)));
}

template <typename T>
T gelu_slope(T z) {
    const T c = T(0.7978845608028654), k = T(0.044715);
    const T t = std::tanh(c * (z + k * z * z * z));
    return T(0.5) * (T(1) + t) * (T(1) + (T(1) - t) * c * z * (T(1) + T(3) * k * z * z));
}

bool bit(const void* mask, int64_t index) {
    return (static_cast<const uint8_t*>(mask)[index / 8] >> (index % 8)) & 1;
}

void set_bit(void* mask, int64_t index, bool on) {
    uint8_t& byte = static_cast<uint8_t*>(mask)[index / 8];
    byte = on ? byte | uint8_t(1u << (index % 8)) : byte & uint8_t(~(1u << (index % 8)));
}

// D (m x n) = epilogue(alpha op(A) op(B) + beta C), column-major, the epilogues of cublasLt.h
template <typename T>
void matmul(const Desc& d, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B,
            int64_t ldb, T beta, const T* C, int64_t ldc, T* D, int64_t ldd) {
    const uint32_t e = d.epilogue;
    T* bias = static_cast<T*>(d.bias);
    if (e & 16) {
        for (int64_t i = 0; i < m; ++i) bias[i] = T(0);
    }
    for (int64_t j = 0; j < n; ++j) {
        for (int64_t i = 0; i < m; ++i) {
            T s = T(0);
            for (int64_t p = 0; p < k; ++p) s += at(A, d.transa, i, p, lda) * at(B, d.transb, p, j, ldb);
            T v = alpha * s + (beta != T(0) ? beta * C[i + j * ldc] : T(0));
            const int64_t a = i + j * d.aux_ld;
            if (e == 4 || e == 6 || e == 134 || e == 36 || e == 164) v += bias[i];  // the bias epilogues
            if (e == 134) {  // RELU_AUX_BIAS
                set_bit(d.aux, a, v > T(0));
                v = v > T(0) ? v : T(0);
            } else if (e == 164) {  // GELU_AUX_BIAS
                static_cast<T*>(d.aux)[a] = v;
                v = gelu(v);
            } else if (e == 152) {  // DRELU_BGRAD
                v = bit(d.aux, a) ? v : T(0);
            } else if (e == 208) {  // DGELU_BGRAD
                v *= gelu_slope(static_cast<const T*>(d.aux)[a]);
            }
            if (e & 16) bias[i] += v;  // the bias gradient of the result
            D[i + j * ldd] = v;
        }
    }
    if (e == 256) {  // BGRADA: the bias gradient from A, over k
        for (int64_t i = 0; i < m; ++i) {
            T s = T(0);
            for (int64_t p = 0; p < k; ++p) s += at(A, d.transa, i, p, lda);
            bias[i] = s;
        }
    }
}

}  // namespace

extern "C" {

// ------------------------------------------------------------------ cuBLAS
int cublasCreate_v2(void** handle) {
    *handle = new Handle();
    return kOk;
}
int cublasDestroy_v2(void* handle) {
    delete static_cast<Handle*>(handle);
    return kOk;
}
int cublasSetStream_v2(void* handle, void* stream) {
    static_cast<Handle*>(handle)->stream = stream;
    return kOk;
}
int cublasSetWorkspace_v2(void* handle, void* workspace, size_t bytes) {
    auto* h = static_cast<Handle*>(handle);
    h->workspace = workspace;
    h->workspace_bytes = bytes;
    return workspace != nullptr && bytes > 0 ? kOk : kInvalid;
}
int cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* A,
                 int atype, int lda, const void* B, int btype, int ldb, const void* beta, void* C, int ctype,
                 int ldc, int compute, int algo) {
    if (handle == nullptr || atype != btype || atype != ctype || algo != -1) return kInvalid;
    if (lda < (transa == 0 ? m : k) || ldb < (transb == 0 ? k : n) || ldc < m) return kInvalid;
    Desc d;
    d.transa = transa;
    d.transb = transb;
    if (atype == 0 && (compute == 68 || compute == 77)) {
        matmul(d, m, n, k, *static_cast<const float*>(alpha), static_cast<const float*>(A), lda,
               static_cast<const float*>(B), ldb, *static_cast<const float*>(beta), static_cast<const float*>(C), ldc,
               static_cast<float*>(C), ldc);
        return kOk;
    }
    if (atype == 1 && compute == 70) {
        matmul(d, m, n, k, *static_cast<const double*>(alpha), static_cast<const double*>(A), lda,
               static_cast<const double*>(B), ldb, *static_cast<const double*>(beta), static_cast<const double*>(C),
               ldc, static_cast<double*>(C), ldc);
        return kOk;
    }
    return kNotSupported;
}

// ------------------------------------------------------------------ cuBLASLt
int cublasLtCreate(void** handle) {
    *handle = new Handle();
    return kOk;
}
int cublasLtDestroy(void* handle) {
    delete static_cast<Handle*>(handle);
    return kOk;
}
int cublasLtMatmulDescCreate(void** desc, int compute, int scale) {
    auto* d = new Desc();
    d->compute = compute;
    d->scale = scale;
    *desc = d;
    return kOk;
}
int cublasLtMatmulDescSetAttribute(void* desc, int attr, const void* buf, size_t bytes) {
    auto* d = static_cast<Desc*>(desc);
    auto take = [&](void* field, size_t size) {
        if (bytes != size) return kInvalid;
        std::memcpy(field, buf, size);
        return kOk;
    };
    switch (attr) {
        case 3: return take(&d->transa, sizeof d->transa);
        case 4: return take(&d->transb, sizeof d->transb);
        case 7: return take(&d->epilogue, sizeof d->epilogue);
        case 8: return take(&d->bias, sizeof d->bias);
        case 11: return take(&d->aux, sizeof d->aux);
        case 12: return take(&d->aux_ld, sizeof d->aux_ld);
        default: return kNotSupported;
    }
}
int cublasLtMatrixLayoutCreate(void** layout, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (ld < static_cast<int64_t>(rows)) return kInvalid;
    *layout = new Layout{type, rows, cols, ld};
    return kOk;
}
int cublasLtMatmulPreferenceCreate(void** pref) {
    *pref = new uint64_t(0);
    return kOk;
}
int cublasLtMatmulPreferenceSetAttribute(void* pref, int attr, const void* buf, size_t bytes) {
    if (attr != 1 || bytes != sizeof(uint64_t)) return kInvalid;
    std::memcpy(pref, buf, bytes);
    return kOk;
}
int cublasLtMatmulAlgoGetHeuristic(void* handle, void* desc, void* a, void* b, void* c, void* dd, void* pref,
                                   int requested, void* results, int* count) {
    const auto* d = static_cast<const Desc*>(desc);
    const auto *A = static_cast<Layout*>(a), *B = static_cast<Layout*>(b), *D = static_cast<Layout*>(dd);
    *count = 0;
    if (handle == nullptr || requested < 1 || c != dd || pref == nullptr) return kInvalid;
    if (A->type != B->type || A->type != D->type || (A->type != 0 && A->type != 1)) return kNotSupported;
    const uint64_t m = d->transa == 0 ? A->rows : A->cols, k = d->transa == 0 ? A->cols : A->rows;
    const uint64_t k2 = d->transb == 0 ? B->rows : B->cols, n = d->transb == 0 ? B->cols : B->rows;
    if (k != k2 || m != D->rows || n != D->cols) return kInvalid;
    const uint32_t e = d->epilogue;
    if ((e & 128) && (d->aux == nullptr || d->aux_ld < static_cast<int64_t>(m)
                      || ((e == 134 || e == 152) && d->aux_ld % 128) || ((e == 164 || e == 208) && d->aux_ld % 8)))
        return kInvalid;
    if ((e & (4 | 16 | 256)) && d->bias == nullptr) return kInvalid;
    std::memset(results, 0, 96);  // cublasLtMatmulHeuristicResult_t
    std::memcpy(results, &kAlgoMark, sizeof kAlgoMark);
    *count = 1;
    return kOk;
}
int cublasLtMatmul(void* handle, void* desc, const void* alpha, const void* A, void* a, const void* B, void* b,
                   const void* beta, const void* C, void* c, void* D, void* dd, const uint64_t* algo,
                   void* workspace, size_t workspace_bytes, void* stream) {
    const auto& d = *static_cast<const Desc*>(desc);
    const auto *la = static_cast<Layout*>(a), *lb = static_cast<Layout*>(b), *lc = static_cast<Layout*>(c),
               *ld = static_cast<Layout*>(dd);
    if (handle == nullptr || algo == nullptr || algo[0] != kAlgoMark || workspace == nullptr || workspace_bytes == 0)
        return kInvalid;
    const int64_t m = ld->rows, n = ld->cols, k = d.transa == 0 ? la->cols : la->rows;
    if (la->type == 0) {
        matmul(d, m, n, k, *static_cast<const float*>(alpha), static_cast<const float*>(A), la->ld,
               static_cast<const float*>(B), lb->ld, *static_cast<const float*>(beta), static_cast<const float*>(C),
               lc->ld, static_cast<float*>(D), ld->ld);
        return kOk;
    }
    matmul(d, m, n, k, *static_cast<const double*>(alpha), static_cast<const double*>(A), la->ld,
           static_cast<const double*>(B), lb->ld, *static_cast<const double*>(beta), static_cast<const double*>(C),
           lc->ld, static_cast<double*>(D), ld->ld);
    return kOk;
}

}  // extern "C"
