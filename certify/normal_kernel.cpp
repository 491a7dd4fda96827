// torch's CPU `normal_` for contiguous float32 tensors of 16 or more values, bit for bit, faster.
//
// torch (ATen/native/cpu/DistributionTemplates.h, AVX2 build) seeds a Mersenne Twister with the
// low 32 bits of the seed, fills the tensor with uniforms (u & 0xFFFFFF) * 2^-24 one call at a
// time, applies Box-Muller to every group of 16 values (log256_ps and sincos256_ps of
// avx_mathfun.h), and, when the size is not a multiple of 16, draws 16 more uniforms into the
// last 16 values and transforms them again. This file does the same arithmetic with the
// twist and the tempering eight words at a time. certify/normal_kernel.py compiles it with
// torch's own avx_mathfun.h and uses it only after it reproduced torch's `normal_` exactly.
#include <cstdint>
#include <immintrin.h>

#include <ATen/native/cpu/avx_mathfun.h>

namespace {

constexpr int N = 624;  // Mersenne Twister state words
constexpr int M = 397;
constexpr uint32_t MATRIX_A = 0x9908b0dfu;

// One twist of the state, in place (the 32-bit reference: next_state of MT19937RNGEngine.h).
inline __m256i twist8(__m256i u, __m256i v, __m256i w) {
  const __m256i upper = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i lower = _mm256_set1_epi32(0x7fffffff);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i y = _mm256_or_si256(_mm256_and_si256(u, upper), _mm256_and_si256(v, lower));
  const __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(v, one), one);
  const __m256i mag = _mm256_and_si256(odd, _mm256_set1_epi32(static_cast<int>(MATRIX_A)));
  return _mm256_xor_si256(_mm256_xor_si256(w, _mm256_srli_epi32(y, 1)), mag);
}

inline uint32_t twist1(uint32_t u, uint32_t v, uint32_t w) {
  return w ^ (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? MATRIX_A : 0u);
}

inline __m256i load8(const uint32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

void next_state(uint32_t* p) {
  int i = 0;
  for (; i + 8 <= N - M; i += 8) {  // reads old words only
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i),
                        twist8(load8(p + i), load8(p + i + 1), load8(p + i + M)));
  }
  for (; i < N - M; ++i) p[i] = twist1(p[i], p[i + 1], p[i + M]);
  for (; i + 8 <= N - 1; i += 8) {  // p[i + M - N] was written above, p[i + 1] was not
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i),
                        twist8(load8(p + i), load8(p + i + 1), load8(p + i + M - N)));
  }
  for (; i < N - 1; ++i) p[i] = twist1(p[i], p[i + 1], p[i + M - N]);
  p[N - 1] = twist1(p[N - 1], p[0], p[M - 1]);
}

// The next `count` uniforms of the stream into out (count <= what is left in the state).
inline void uniforms(const uint32_t* state, float* out, int count) {
  const __m256i mask_b = _mm256_set1_epi32(static_cast<int>(0x9d2c5680u));
  const __m256i mask_c = _mm256_set1_epi32(static_cast<int>(0xefc60000u));
  const __m256i low24 = _mm256_set1_epi32(0xffffff);
  const __m256 scale = _mm256_set1_ps(1.0f / 16777216.0f);
  int i = 0;
  for (; i + 8 <= count; i += 8) {
    __m256i y = load8(state + i);
    y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 11));
    y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 7), mask_b));
    y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 15), mask_c));
    y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 18));
    const __m256 u = _mm256_cvtepi32_ps(_mm256_and_si256(y, low24));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(u, scale));
  }
  for (; i < count; ++i) {
    uint32_t y = state[i];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    out[i] = static_cast<float>(y & 0xffffffu) * (1.0f / 16777216.0f);
  }
}

struct Stream {
  uint32_t state[N];
  int next;  // state words already used since the last twist (N: twist before the next)

  explicit Stream(uint64_t seed) : next(N) {
    state[0] = static_cast<uint32_t>(seed & 0xffffffffu);
    for (int j = 1; j < N; ++j) {
      state[j] = 1812433253u * (state[j - 1] ^ (state[j - 1] >> 30)) + static_cast<uint32_t>(j);
    }
  }

  void fill(float* out, int64_t count) {
    while (count > 0) {
      if (next == N) {
        next_state(state);
        next = 0;
      }
      const int take = static_cast<int>(count < N - next ? count : N - next);
      uniforms(state + next, out, take);
      next += take;
      out += take;
      count -= take;
    }
  }
};

// Box-Muller on 16 values: NormalFill16<float, true> of DistributionTemplates.h.
inline void normal_fill_16(float* data, __m256 mean, __m256 std) {
  const __m256 two_pi = _mm256_set1_ps(static_cast<float>(2.0f * 3.14159265358979323846));
  const __m256 u1 = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_loadu_ps(data));
  const __m256 u2 = _mm256_loadu_ps(data + 8);
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log256_ps(u1)));
  const __m256 theta = _mm256_mul_ps(two_pi, u2);
  __m256 sintheta, costheta;
  sincos256_ps(theta, &sintheta, &costheta);
  const __m256 n1 = _mm256_mul_ps(radius, costheta);
  const __m256 n2 = _mm256_mul_ps(radius, sintheta);
  _mm256_storeu_ps(data, _mm256_fmadd_ps(n1, std, mean));
  _mm256_storeu_ps(data + 8, _mm256_fmadd_ps(n2, std, mean));
}

}  // namespace

extern "C" {

// What torch.Generator().manual_seed(seed) then data.normal_(mean, std, generator=...) writes,
// for contiguous float32 data of size >= 16.
int topk_normal_fill(float* data, int64_t size, uint64_t seed, float mean, float std) {
  if (size < 16) return 1;
  Stream stream(seed);
  const __m256 mean_v = _mm256_set1_ps(mean);
  const __m256 std_v = _mm256_set1_ps(std);
  // Uniforms, then Box-Muller, one block of N values at a time (while they are in L1 cache).
  // N is a multiple of 16, so the groups of 16 are those of torch's single pass.
  for (int64_t block = 0; block < size; block += N) {
    const int64_t end = size - block < N ? size : block + N;
    stream.fill(data + block, end - block);
    for (int64_t i = block; i < end - 15; i += 16) normal_fill_16(data + i, mean_v, std_v);
  }
  if (size % 16 != 0) {
    stream.fill(data + size - 16, 16);
    normal_fill_16(data + size - 16, mean_v, std_v);
  }
  return 0;
}

}  // extern "C"
