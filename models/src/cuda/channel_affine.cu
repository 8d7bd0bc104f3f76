// A per-channel affine epilogue and its gradient for f32 tensors on CUDA (see
// models/src/channel_affine.rs): relu?(x * scale + shift + residual).
//
// x is read as rows of `spatial` consecutive elements, row = sample * channels + channel. `scale`
// and `shift` hold one value per row index modulo their length: `channels` values for a bias or a
// folded batch norm, `samples * channels` for a timestep embedding. One thread per element in a
// grid-stride loop, 32-bit indices (the caller checks the element count): the one division per
// element is what candle's broadcast kernels spend eight 64-bit divisions and modulos on.

extern "C" __global__ void channel_affine_fwd_f32(const float* x, const float* scale, const float* shift,
                                                  const float* residual, float* y, unsigned int numel,
                                                  unsigned int spatial, unsigned int scale_len,
                                                  unsigned int shift_len, int has_scale, int has_residual,
                                                  int relu) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += blockDim.x * gridDim.x) {
        unsigned int row = i / spatial;
        float v = x[i];
        if (has_scale) v *= scale[row % scale_len];
        v += shift[row % shift_len];
        if (has_residual) v += residual[i];
        // NaN passes through, as in PyTorch's ReLU.
        y[i] = (relu && v < 0.0f) ? 0.0f : v;
    }
}

// Given dy and the forward's output y: `masked` = dy where the ReLU passed its input (y > 0), or dy
// itself without a ReLU; with a scale, `dx` = masked * scale. The gradients of shift (summed by the
// caller) and of the residual are `masked`.
extern "C" __global__ void channel_affine_bwd_f32(const float* dy, const float* y, const float* scale,
                                                  float* masked, float* dx, unsigned int numel,
                                                  unsigned int spatial, unsigned int scale_len, int has_scale,
                                                  int relu) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += blockDim.x * gridDim.x) {
        float g = (relu && !(y[i] > 0.0f)) ? 0.0f : dy[i];
        masked[i] = g;
        if (has_scale) dx[i] = g * scale[(i / spatial) % scale_len];
    }
}
