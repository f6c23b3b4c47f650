// CUDA C kernels of the binary algebra for the CuPy backend (loaded with cupy.RawModule).
// Packed rows are read as 64-bit words (the host pads widths to a multiple of 8 bytes with
// zeros, which XOR to zero); bits are LSB first, as np.packbits(..., bitorder="little").
#include <climits>

extern "C" {

// out[i, j] = popcount(a_i ^ b_j), or n_bits - 2 * popcount(a_i ^ b_j) (the exact +-1 dot
// product) when signed_dot != 0. Block: TILE x TILE threads; grid: (ceil(N/TILE), ceil(M/TILE)).
#define TILE 16
__global__ void popcount_gemm_u64(const unsigned long long* __restrict__ a,
                                  const unsigned long long* __restrict__ b,
                                  int* __restrict__ out, int M, int N, int words,
                                  int n_bits, int signed_dot) {
    __shared__ unsigned long long tile_a[TILE][TILE + 1];
    __shared__ unsigned long long tile_b[TILE][TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long a_row = (long long)blockIdx.y * TILE + ty;
    const long long b_row = (long long)blockIdx.x * TILE + ty;
    int count = 0;
    for (int w0 = 0; w0 < words; w0 += TILE) {
        const int w = w0 + tx;
        tile_a[ty][tx] = (a_row < M && w < words) ? a[a_row * words + w] : 0ull;
        tile_b[ty][tx] = (b_row < N && w < words) ? b[b_row * words + w] : 0ull;
        __syncthreads();
#pragma unroll
        for (int i = 0; i < TILE; ++i) count += __popcll(tile_a[ty][i] ^ tile_b[tx][i]);
        __syncthreads();
    }
    const long long row = (long long)blockIdx.y * TILE + ty;
    const long long col = (long long)blockIdx.x * TILE + tx;
    if (row < M && col < N) out[row * N + col] = signed_dot ? n_bits - 2 * count : count;
}

// in: (rows, n) bytes of 0/1; out: (rows, width) packed bytes. One thread per output byte.
__global__ void pack_bool_rows(const unsigned char* __restrict__ in, unsigned char* __restrict__ out,
                               long long rows, int n, int width) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * width) return;
    const long long r = i / width;
    const int w = (int)(i % width);
    unsigned int byte = 0;
    for (int j = 0; j < 8; ++j) {
        const int c = w * 8 + j;
        if (c < n && in[r * n + c]) byte |= 1u << j;
    }
    out[i] = (unsigned char)byte;
}

// in: (rows, width) packed bytes; out: (rows, n) bytes of 0/1. One thread per output bit.
__global__ void unpack_bits_rows(const unsigned char* __restrict__ in, unsigned char* __restrict__ out,
                                 long long rows, int n, int width) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * n) return;
    const long long r = i / n;
    const int c = (int)(i % n);
    out[i] = (in[r * width + c / 8] >> (c % 8)) & 1u;
}

// Per-block partial top-k. Block (chunk, query) computes the distances of one query to CHUNK
// database codes, sorts the keys (distance << 32 | index) in shared memory (bitonic) and writes
// its k smallest to cand[query, chunk, :k]; the host merges the chunks. Keys are unique, so ties
// go to the lower index by construction. Block: 512 threads; k <= CHUNK; database < 2^31 codes.
#define CHUNK 1024
__global__ void hamming_topk_chunks(const unsigned long long* __restrict__ q,
                                    const unsigned long long* __restrict__ db,
                                    long long* __restrict__ cand, int n_db, int words, int k,
                                    int n_chunks) {
    __shared__ long long keys[CHUNK];
    const long long query = blockIdx.y;
    const int chunk = blockIdx.x;
    const unsigned long long* q_row = q + query * words;
    for (int t = threadIdx.x; t < CHUNK; t += blockDim.x) {
        const long long j = (long long)chunk * CHUNK + t;
        long long key = LLONG_MAX;
        if (j < n_db) {
            const unsigned long long* d_row = db + j * words;
            long long d = 0;
            for (int w = 0; w < words; ++w) d += __popcll(q_row[w] ^ d_row[w]);
            key = (d << 32) | j;
        }
        keys[t] = key;
    }
    __syncthreads();
    for (int size = 2; size <= CHUNK; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int t = threadIdx.x; t < CHUNK / 2; t += blockDim.x) {
                const int lo = 2 * stride * (t / stride) + (t % stride);
                const int hi = lo + stride;
                const bool ascending = (lo & size) == 0;
                const long long x = keys[lo], y = keys[hi];
                if ((x > y) == ascending) {
                    keys[lo] = y;
                    keys[hi] = x;
                }
            }
            __syncthreads();
        }
    }
    for (int t = threadIdx.x; t < k; t += blockDim.x) cand[(query * n_chunks + chunk) * k + t] = keys[t];
}

}  // extern "C"
