// im2col and col2im for f32 convolutions on CUDA (see models/src/im2col.rs): the window gathers
// around which cuBLAS gemms make a convolution's forward, input gradient and kernel gradient.
//
// A column row is one (sample, window entry) pair, window entry k = (channel, ky, kx) in the
// weight's [c_out, c_in, kh, kw] order, and holds that entry for every output position p = (oy,
// ox). Rows are numbered sample-major (row = sample * K + k: [n, K, P], so that W @ cols of one
// sample is its NCHW output) or entry-major (row = k * samples + sample: [K, n * P], so that the
// kernel gradient is one gemm). The grid's y dimension walks rows, its x dimension positions:
// each thread divides once by the output width, where candle's im2col spends a 64-bit division and
// modulo per dimension per element. 32-bit indices within a plane or row; the caller keeps every
// buffer under 2^31 elements.

extern "C" __global__ void im2col_f32(const float* __restrict__ x, float* __restrict__ cols, unsigned int rows,
                                      unsigned int samples, unsigned int channels, unsigned int h, unsigned int w,
                                      unsigned int kh, unsigned int kw, unsigned int stride, unsigned int pad,
                                      unsigned int oh, unsigned int ow, int sample_major) {
    const unsigned int positions = oh * ow;
    const unsigned int taps = kh * kw;
    const unsigned int entries = channels * taps;
    for (unsigned int row = blockIdx.y; row < rows; row += gridDim.y) {
        unsigned int sample, k;
        if (sample_major) {
            sample = row / entries;
            k = row - sample * entries;
        } else {
            k = row / samples;
            sample = row - k * samples;
        }
        const unsigned int channel = k / taps;
        const unsigned int tap = k - channel * taps;
        const unsigned int ky = tap / kw;
        const unsigned int kx = tap - ky * kw;
        const float* plane = x + (size_t)(sample * channels + channel) * h * w;
        float* out = cols + (size_t)row * positions;
        const int y0 = (int)ky - (int)pad;
        const int x0 = (int)kx - (int)pad;
        for (unsigned int p = blockIdx.x * blockDim.x + threadIdx.x; p < positions; p += blockDim.x * gridDim.x) {
            const unsigned int oy = p / ow;
            const unsigned int ox = p - oy * ow;
            const int y = (int)(oy * stride) + y0;
            const int xx = (int)(ox * stride) + x0;
            out[p] = (y >= 0 && y < (int)h && xx >= 0 && xx < (int)w) ? plane[y * (int)w + xx] : 0.0f;
        }
    }
}

// The adjoint of im2col for sample-major columns: every input position of plane (sample, channel)
// sums the column entries its windows hold, gathered (no atomics, a fixed order of summation).
// Tap (ky, kx) covers input row y from output row oy = (y + pad - ky) / stride when that division
// is exact and oy < oh; likewise for columns.
extern "C" __global__ void col2im_f32(const float* __restrict__ cols, float* __restrict__ dx, unsigned int planes,
                                      unsigned int h, unsigned int w, unsigned int kh, unsigned int kw,
                                      unsigned int stride, unsigned int pad, unsigned int oh, unsigned int ow) {
    const unsigned int positions = oh * ow;
    const unsigned int area = h * w;
    for (unsigned int plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        // Sample-major rows of this plane: (sample * channels + channel) * taps + tap.
        const float* in = cols + (size_t)plane * kh * kw * positions;
        float* out = dx + (size_t)plane * area;
        for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < area; i += blockDim.x * gridDim.x) {
            const unsigned int y = i / w;
            const unsigned int xx = i - y * w;
            float sum = 0.0f;
            for (unsigned int ky = 0; ky < kh; ++ky) {
                const int ty = (int)(y + pad) - (int)ky;
                if (ty < 0 || ty % (int)stride != 0) continue;
                const unsigned int oy = ty / stride;
                if (oy >= oh) continue;
                for (unsigned int kx = 0; kx < kw; ++kx) {
                    const int tx = (int)(xx + pad) - (int)kx;
                    if (tx < 0 || tx % (int)stride != 0) continue;
                    const unsigned int ox = tx / stride;
                    if (ox >= ow) continue;
                    sum += in[(size_t)(ky * kw + kx) * positions + oy * ow + ox];
                }
            }
            out[i] = sum;
        }
    }
}
