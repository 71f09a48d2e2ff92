// The fully fused training pass of a narrow MLP, after tiny-cuda-nn's fully fused MLPs, in plain arithmetic
// (no tensor-core paths yet): one kernel runs the forward pass, the softmax cross-entropy and the backward
// pass of a tile of rows through every layer. The tile's activations and one layer's weights at a time live
// in shared memory; global memory sees the batch, the network's output, the per-row losses and the weight
// gradients. The cupy backend runs it for float32, float64 and bfloat16 compute where the shared arrays
// fit a block (CupyBackend.set_fused_mlp).
#include "common.cuh"

// Shared memory, in T, for tiles of R rows (cupy_backend.mlp_shared_bytes computes the same sizes):
//   acts    R * (n_0 + ... + n_L)      every layer's output for the tile, the input first, row-major per layer
//   pre     R * (n_1 + ... + n_{L-1})  the hidden layers' Z, for activations whose g' reads Z (else none)
//   w       max over layers of (n_in + 1) * n_out: one layer's [W; b]
//   d0, d1  R * max(n_1, ..., n_L) each: the delta of a layer and of the layer below
// `sizes` holds the L + 1 widths; `params` is the model's flat parameter vector, per layer W (n_in x n_out)
// then b (n_out): each layer's [W; b] is one (n_in + 1) x n_out block, and so is its gradient in `partial`.
//
// Block b runs tiles b, b + gridDim.x, ... (the grid is at most the tile count, so every block has one) and
// adds its tiles' gradients into its own row of `partial` (gridDim.x x n_params, in Acc<T>); sum_partials
// (dense.cu) then adds the rows in block order. Fixed tiles and orders, no atomics: the same bits every run
// with the same grid. Each row's loss and whether its first maximum is its label go into
// row_stats[row] and row_stats[rows + row], as softmax_ce writes them (reduce_loss reads both); a label
// outside [0, C) makes its row's loss and delta NaN.
template <typename T, int ACT>
__global__ void mlp_fused_pass(const T* __restrict__ X, const long long* __restrict__ y, const T* __restrict__ params,
                               const long long* __restrict__ sizes, int layers, int rows, int tile_rows,
                               T* __restrict__ out, typename Acc<T>::type* __restrict__ row_stats,
                               typename Acc<T>::type* __restrict__ partial, long long n_params) {
    using A = typename Acc<T>::type;
    using C = typename Compute<T>::type;
    extern __shared__ __align__(16) unsigned char mlp_shared[];
    const int R = tile_rows;
    int widths = 0, hidden = 0, w_size = 0, d_size = 0;
    for (int l = 0; l <= layers; ++l) {
        const int n = static_cast<int>(sizes[l]);
        widths += n;
        if (l > 0) {
            d_size = max(d_size, n);
            w_size = max(w_size, (static_cast<int>(sizes[l - 1]) + 1) * n);
            hidden += l < layers ? n : 0;
        }
    }
    T* const acts = reinterpret_cast<T*>(mlp_shared);
    T* const pre = acts + R * widths;
    T* const w = pre + (keeps_preactivation<ACT> ? R * hidden : 0);
    T* const d0 = w + w_size;
    T* const d1 = d0 + R * d_size;
    A* const sums = partial + static_cast<long long>(blockIdx.x) * n_params;
    const int t = threadIdx.x;
    const int nt = blockDim.x;
    const int n0 = static_cast<int>(sizes[0]);
    const int classes = static_cast<int>(sizes[layers]);
    const A inv_rows = A(1) / static_cast<A>(rows);
    const int tiles = (rows + R - 1) / R;
    bool first = true;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int r0 = tile * R;
        const int nr = min(R, rows - r0);
        __syncthreads();  // the previous tile is done with acts
        for (int k = t; k < nr * n0; k += nt) {
            acts[k] = X[static_cast<long long>(r0) * n0 + k];
        }
        // ---- forward: z = a W + b, a = g(z); the output layer's z is the network's output
        long long p_off = 0;  // the layer's [W; b] in params
        int a_off = 0;        // its input in acts
        int z_off = 0;        // its Z in pre
        for (int l = 1; l <= layers; ++l) {
            const int n_in = static_cast<int>(sizes[l - 1]);
            const int n_out = static_cast<int>(sizes[l]);
            __syncthreads();  // the layer below is written, and done reading w
            for (int k = t; k < (n_in + 1) * n_out; k += nt) {
                w[k] = params[p_off + k];
            }
            __syncthreads();
            const T* a_in = acts + a_off;
            T* a_out = acts + a_off + R * n_in;
            for (int k = t; k < nr * n_out; k += nt) {
                const int r = k / n_out;
                const int j = k - r * n_out;
                A s = A(0);
                for (int i = 0; i < n_in; ++i) {
                    s += static_cast<A>(load(a_in[r * n_in + i])) * static_cast<A>(load(w[i * n_out + j]));
                }
                // rounded as the op path rounds: the product, then the bias added, then g
                const T z = store<T>(load(store<T>(s)) + load(w[n_in * n_out + j]));
                if (l < layers) {
                    if constexpr (keeps_preactivation<ACT>) {
                        pre[z_off + k] = z;
                    }
                    a_out[k] = store<T>(act_forward<C, ACT>(load(z)));
                } else {
                    a_out[k] = z;
                    out[static_cast<long long>(r0 + r) * n_out + j] = z;
                }
            }
            p_off += static_cast<long long>(n_in + 1) * n_out;
            a_off += R * n_in;
            z_off += l < layers ? R * n_out : 0;
        }
        __syncthreads();
        // ---- eq. (1): the softmax cross-entropy's delta (softmax - onehot) / rows, a thread per row
        const T* logits = acts + a_off;
        for (int r = t; r < nr; r += nt) {
            const T* z = logits + r * classes;
            T* d = d0 + r * classes;
            const long long row = r0 + r;
            A m = load(z[0]);
            int predicted = 0;
            for (int c = 1; c < classes; ++c) {
                if (load(z[c]) > m) {
                    m = load(z[c]);
                    predicted = c;
                }
            }
            A s = A(0);
            for (int c = 0; c < classes; ++c) {
                s += m_exp(load(z[c]) - m);
            }
            const long long label = y[row];
            if (label < 0 || label >= classes) {
                for (int c = 0; c < classes; ++c) {
                    d[c] = quiet_nan<T>();
                }
                row_stats[row] = quiet_nan<A>();
                row_stats[rows + row] = A(0);
                continue;
            }
            for (int c = 0; c < classes; ++c) {
                const A p = m_exp(load(z[c]) - m) / s;
                d[c] = store<T>((p - (c == label ? A(1) : A(0))) * inv_rows);
            }
            row_stats[row] = m_log(s) + m - load(z[label]);
            row_stats[rows + row] = predicted == label ? A(1) : A(0);
        }
        // ---- backward, from the output layer down
        T* delta = d0;
        for (int l = layers; l >= 1; --l) {
            const int n_in = static_cast<int>(sizes[l - 1]);
            const int n_out = static_cast<int>(sizes[l]);
            p_off -= static_cast<long long>(n_in + 1) * n_out;
            a_off -= R * n_in;
            __syncthreads();  // delta is written, and w is free
            const T* a_in = acts + a_off;
            // eqs. (3) and (4): the tile's [dW; db] (db: the row of ones below a_in), into the block's sums
            for (int k = t; k < (n_in + 1) * n_out; k += nt) {
                const int i = k / n_out;
                const int j = k - i * n_out;
                A s = A(0);
                if (i < n_in) {
                    for (int r = 0; r < nr; ++r) {
                        s += static_cast<A>(load(a_in[r * n_in + i])) * static_cast<A>(load(delta[r * n_out + j]));
                    }
                } else {
                    for (int r = 0; r < nr; ++r) {
                        s += static_cast<A>(load(delta[r * n_out + j]));
                    }
                }
                sums[p_off + k] = first ? s : sums[p_off + k] + s;
            }
            if (l == 1) {
                break;  // the input needs no delta
            }
            // eq. (2): the delta below = (delta W^T) * g'(S), S the layer below's A, or its Z. W goes in
            // transposed, rows padded to an odd length, so that the threads of a warp, each on its own i, read
            // consecutive words (W's own rows would put them all in one bank) and write distinct banks
            const int stride = n_in | 1;
            for (int k = t; k < n_in * n_out; k += nt) {
                const int i = k / n_out;
                w[(k - i * n_out) * stride + i] = params[p_off + k];
            }
            __syncthreads();
            T* below = delta == d0 ? d1 : d0;
            z_off -= R * n_in;
            for (int k = t; k < nr * n_in; k += nt) {
                const int r = k / n_in;
                const int i = k - r * n_in;
                A s = A(0);
                for (int j = 0; j < n_out; ++j) {
                    s += static_cast<A>(load(delta[r * n_out + j])) * static_cast<A>(load(w[j * stride + i]));
                }
                C d = load(store<T>(s));
                const T kept = keeps_preactivation<ACT> ? pre[z_off + k] : a_in[k];
                below[k] = store<T>(d * act_grad<C, ACT>(load(kept)));
            }
            delta = below;
        }
        first = false;
    }
}
