// Group normalization with a per-sample, per-channel affine and an optional SiLU, forward and
// backward, for f32 NCHW tensors on CUDA (see models/src/group_norm_cuda.rs).
//
// One block per (sample, group): the group's channels are consecutive, so its `cpg * spatial`
// elements are one contiguous row of x. Statistics are accumulated in double (as the CPU op does):
// a mean pass, then a pass for the mean squared deviation.

#define THREADS 256

// Sum of `v` over the block; every thread gets the result.
__device__ double block_sum(double v, double* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // `shared` may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < (blockDim.x + 31) / 32; ++w) total += shared[w];
    return total;
}

__device__ void row_stats(const float* xr, long m, float eps, double* shared, float* mean_out, float* rstd_out) {
    double s = 0.0;
    for (long i = threadIdx.x; i < m; i += blockDim.x) s += xr[i];
    double mean = block_sum(s, shared) / (double)m;
    double v = 0.0;
    for (long i = threadIdx.x; i < m; i += blockDim.x) {
        double d = (double)xr[i] - mean;
        v += d * d;
    }
    double var = block_sum(v, shared) / (double)m;
    *mean_out = (float)mean;
    *rstd_out = (float)(1.0 / sqrt(var + (double)eps));
}

__device__ float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

// y = silu?((x - mean) * rstd * a[n, c] + b[n, c]).
extern "C" __global__ void group_norm_fwd_f32(const float* x, const float* a, const float* b, float* y,
                                              int channels, int cpg, int spatial, float eps, int silu) {
    __shared__ double shared[32];
    long row = blockIdx.x;
    long m = (long)cpg * spatial;
    const float* xr = x + row * m;
    float* yr = y + row * m;
    float mean, rstd;
    row_stats(xr, m, eps, shared, &mean, &rstd);
    int groups = channels / cpg;
    long ch0 = (row / groups) * channels + (row % groups) * cpg;  // index into a, b of the group's first channel
    for (long i = threadIdx.x; i < m; i += blockDim.x) {
        long ch = ch0 + i / spatial;
        float pre = (xr[i] - mean) * rstd * a[ch] + b[ch];
        yr[i] = silu ? pre * sigmoidf(pre) : pre;
    }
}

// Gradients of group_norm_fwd_f32 given dy: `out` holds dx (n * c * spatial), then da (n * c), then db.
extern "C" __global__ void group_norm_bwd_f32(const float* x, const float* dy, const float* a, const float* b,
                                              float* out, int samples, int channels, int cpg, int spatial,
                                              float eps, int silu) {
    __shared__ double shared[32];
    long row = blockIdx.x;
    long m = (long)cpg * spatial;
    const float* xr = x + row * m;
    const float* gr = dy + row * m;
    float* dxr = out + row * m;
    long nc = (long)samples * channels;
    float* da = out + nc * spatial;
    float* db = da + nc;
    float mean, rstd;
    row_stats(xr, m, eps, shared, &mean, &rstd);
    int groups = channels / cpg;
    long ch0 = (row / groups) * channels + (row % groups) * cpg;
    // Per channel: da = sum dz * xhat, db = sum dz; the group's sums of a * dz and a * dz * xhat follow.
    double s1 = 0.0, s2 = 0.0;
    for (int k = 0; k < cpg; ++k) {
        long ch = ch0 + k;
        float ak = a[ch], bk = b[ch];
        double pa = 0.0, pb = 0.0;
        for (long i = threadIdx.x; i < spatial; i += blockDim.x) {
            long j = (long)k * spatial + i;
            float xhat = (xr[j] - mean) * rstd;
            float dz = gr[j];
            if (silu) {
                float pre = xhat * ak + bk, sg = sigmoidf(pre);
                dz *= sg * (1.0f + pre * (1.0f - sg));
            }
            pa += (double)dz * xhat;
            pb += dz;
        }
        double ta = block_sum(pa, shared), tb = block_sum(pb, shared);
        if (threadIdx.x == 0) {
            da[ch] = (float)ta;
            db[ch] = (float)tb;
        }
        s1 += (double)ak * tb;
        s2 += (double)ak * ta;
    }
    float m1 = (float)(s1 / (double)m), m2 = (float)(s2 / (double)m);
    for (long i = threadIdx.x; i < m; i += blockDim.x) {
        long ch = ch0 + i / spatial;
        float ak = a[ch];
        float xhat = (xr[i] - mean) * rstd;
        float dz = gr[i];
        if (silu) {
            float pre = xhat * ak + b[ch], sg = sigmoidf(pre);
            dz *= sg * (1.0f + pre * (1.0f - sg));
        }
        dxr[i] = rstd * (ak * dz - m1 - xhat * m2);
    }
}
