// Attention of queries over KIVI codes, fused: dequantise one position at a time, score it,
// softmax over the range, mix the values. An XLA FFI handler for the CPU (jax.ffi), built by
// native.py; reference.py is the jnp statement of the same result.
//
// Shapes (b batch, n stored positions, kvh key/value heads, hd head dim, r query rows per head,
// w = hd * bits / 8 bytes of codes per position and head, G the group):
//   q       (b, kvh, r, hd) f32, already scaled by 1 / sqrt(hd)
//   kcodes  (b, n, kvh, w) u8     kscale, kzero (b, n / G, kvh, hd) f16   keys per channel
//   vcodes  (b, n, kvh, w) u8     vscale, vzero (b, n, kvh, hd / G) f16   values per token
//   bounds  (2,) s32: positions [lo, hi) are read
// Results: m (b, kvh, r) the largest score (float32 min when the range is empty), den (b, kvh, r)
// the sum of exp(score - m), acc (b, kvh, r, hd) the sum of exp(score - m) * value.
// Codes are little-endian bit fields: code j of a row at bits [j * bits, (j + 1) * bits).

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__F16C__)
#include <immintrin.h>
inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {  // inf or nan
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {  // normal
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {  // zero
    bits = sign;
  } else {  // subnormal: normalise
    uint32_t e = 113u;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
#endif

// The codes of one row, unpacked into "field-major" order: byte i holds channels P * i + j
// (j < P = 8 / BITS fields) and channel P * i + j goes to index j * W + i (W = HD / P bytes).
// Every loop over this order is contiguous (vectorises); queries and scales are permuted to match.
template <int BITS, int HD>
inline void unpack(const uint8_t* row, float* out) {
  constexpr int P = 8 / BITS, W = HD / P;
  constexpr unsigned mask = (1u << BITS) - 1u;
  for (int j = 0; j < P; ++j)
    for (int i = 0; i < W; ++i) out[j * W + i] = static_cast<float>((row[i] >> (j * BITS)) & mask);
}

template <int BITS, int HD>
constexpr int permuted(int c) {
  return (c % (8 / BITS)) * (HD / (8 / BITS)) + c / (8 / BITS);
}

// exp(x) to about 1e-7 relative (Cephes' expf: x = n ln 2 + r, a degree-6 polynomial in r), in
// plain arithmetic so a loop of it vectorises; NaN stays NaN, x < -87 gives 0.
inline float exp_approx(float x) {
  const float t = x < -87.0f ? -87.0f : x;
  const float n = std::floor(t * 1.44269504088896341f + 0.5f);
  const float r = (t - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof scale);
  return x < -87.0f ? 0.0f : y * scale;
}

// sum of a[0 .. n) in 16 independent lanes (vectorisable without reassociating one sum)
inline float sum(const float* a, int64_t n) {
  float lanes[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += a[j + l];
  float total = 0.0f;
  for (; j < n; ++j) total += a[j];
  for (int l = 0; l < 16; ++l) total += lanes[l];
  return total;
}

// One batch row and key/value head. Keys: q . k = (q * scale) . code + q . zero per key group, so
// a position costs its unpacking and r dot products. Values: p * v = p * (scale * code) + p * zero
// per value group; the zero terms are summed per group and added once at the end.
template <int BITS, int HD, int G>
void attend_head(const float* q, const uint8_t* kcodes, const uint16_t* kscale, const uint16_t* kzero,
                 const uint8_t* vcodes, const uint16_t* vscale, const uint16_t* vzero, int64_t lo, int64_t hi,
                 int64_t kvh, int64_t r, float* m, float* den, float* acc) {
  constexpr int P = 8 / BITS, W = HD / P, GROUPS = HD / G;
  const int64_t code_stride = kvh * W, kside_stride = kvh * HD, vside_stride = kvh * GROUPS;
  const int64_t n = hi - lo;
  std::vector<float> scores(static_cast<size_t>(r * std::max<int64_t>(n, 1)));
  std::vector<float> qs((r + 3) / 4 * 4 * HD, 0.0f), qz(r);
  constexpr unsigned MASK = (1u << BITS) - 1u;
  alignas(64) float x[HD], scale[HD], zero[HD];
  alignas(64) uint8_t bytes[W * G];
  for (int64_t g = lo / G; g * G < hi; ++g) {
    const uint16_t* ks = kscale + g * kside_stride;
    const uint16_t* kz = kzero + g * kside_stride;
    for (int c = 0; c < HD; ++c) {
      scale[permuted<BITS, HD>(c)] = half_to_float(ks[c]);
      zero[c] = half_to_float(kz[c]);
    }
    for (int64_t i = 0; i < r; ++i) {
      float z = 0.0f;
      for (int c = 0; c < HD; ++c) {
        qs[i * HD + permuted<BITS, HD>(c)] = q[i * HD + c] * scale[permuted<BITS, HD>(c)];
        z += q[i * HD + c] * zero[c];
      }
      qz[i] = z;
    }
    // the group's code bytes transposed (bytes[i][s]: byte i of position s), so that each code
    // field unpacks into G positions at once and the G scores come out of G-wide vector products,
    // with no sum across a vector per position
    for (int s = 0; s < G; ++s) {
      const uint8_t* row = kcodes + (g * G + s) * code_stride;
      for (int i = 0; i < W; ++i) bytes[i * G + s] = row[i];
    }
    for (int64_t i0 = 0; i0 < r; i0 += 4) {  // four query rows at a time share each unpacked field
      const int64_t rows = std::min<int64_t>(4, r - i0);
      alignas(64) float sc[4][G];
      for (int64_t i = 0; i < 4; ++i)
        for (int s = 0; s < G; ++s) sc[i][s] = i < rows ? qz[i0 + i] : 0.0f;
      for (int i = 0; i < W; ++i)
        for (int j = 0; j < P; ++j) {
          alignas(64) float f[G];
          for (int s = 0; s < G; ++s) f[s] = static_cast<float>((bytes[i * G + s] >> (j * BITS)) & MASK);
          for (int u = 0; u < 4; ++u) {  // rows past r have weight 0 (qs is padded to whole blocks)
            const float w = qs[(i0 + u) * HD + j * W + i];
            for (int s = 0; s < G; ++s) sc[u][s] += w * f[s];
          }
        }
      const int64_t first = std::max(lo, g * G) - g * G, last = std::min(hi, (g + 1) * G) - g * G;
      for (int64_t u = 0; u < rows; ++u)
        for (int64_t s = first; s < last; ++s) scores[(i0 + u) * n + (g * G + s - lo)] = sc[u][s];
    }
  }
  for (int64_t i = 0; i < r; ++i) {
    float* row = scores.data() + i * n;
    float best = -FLT_MAX;
    bool nan = false;
    for (int64_t j = 0; j < n; ++j) {
      best = std::max(best, row[j]);
      nan |= row[j] != row[j];
    }
    if (nan) best = NAN;
    for (int64_t j = 0; j < n; ++j) row[j] = exp_approx(row[j] - best);
    m[i] = best;
    den[i] = sum(row, n);
  }
  for (int64_t i0 = 0; i0 < r; i0 += 4) {  // four query rows at a time share each unpacked value
    const int64_t rows = std::min<int64_t>(4, r - i0);
    alignas(64) float a[4][HD] = {}, az[4][GROUPS] = {};
    for (int64_t s = lo; s < hi; ++s) {
      unpack<BITS, HD>(vcodes + s * code_stride, x);
      float sc[GROUPS], ze[GROUPS], p[4];
      for (int j = 0; j < GROUPS; ++j) {
        sc[j] = half_to_float(vscale[s * vside_stride + j]);
        ze[j] = half_to_float(vzero[s * vside_stride + j]);
      }
      for (int u = 0; u < 4; ++u) p[u] = u < rows ? scores[(i0 + u) * n + (s - lo)] : 0.0f;
      for (int u = 0; u < 4; ++u)
        for (int j = 0; j < GROUPS; ++j) {
          const float w = p[u] * sc[j];
          az[u][j] += p[u] * ze[j];
          for (int f = 0; f < P; ++f)  // field f's entries of value group j: one contiguous run
            for (int k = f * W + j * (G / P); k < f * W + (j + 1) * (G / P); ++k) a[u][k] += w * x[k];
        }
    }
    for (int64_t u = 0; u < rows; ++u)
      for (int c = 0; c < HD; ++c) acc[(i0 + u) * HD + c] = a[u][permuted<BITS, HD>(c)] + az[u][c / G];
  }
}

using Head = void (*)(const float*, const uint8_t*, const uint16_t*, const uint16_t*, const uint8_t*,
                      const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, int64_t, float*, float*, float*);

// the compiled (bits, head_dim, group) combinations; native.py keeps to them
template <int BITS>
Head pick(int64_t hd, int64_t group) {
  if (hd == 64 && group == 32) return attend_head<BITS, 64, 32>;
  if (hd == 64 && group == 64) return attend_head<BITS, 64, 64>;
  if (hd == 128 && group == 32) return attend_head<BITS, 128, 32>;
  if (hd == 128 && group == 64) return attend_head<BITS, 128, 64>;
  return nullptr;
}

// Work shared by the calling thread and the helpers it schedules on XLA's intra-op pool: each
// takes the next chunk until none is left. A helper that starts after the call has returned (the
// pool was busy) finds no chunk and touches nothing but this shared object.
struct Chunks {
  std::atomic<int64_t> next{0}, done{0};
  int64_t total = 0;
  std::function<void(int64_t)> run;
  std::mutex mu;
  std::condition_variable finished;
};

void drain(const std::shared_ptr<Chunks>& work) {
  for (int64_t c = work->next++; c < work->total; c = work->next++) {
    work->run(c);
    if (++work->done == work->total) {
      std::lock_guard<std::mutex> lock(work->mu);
      work->finished.notify_all();
    }
  }
}

ffi::Error KiviAttendImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::U8> kcodes,
                          ffi::Buffer<ffi::F16> kscale, ffi::Buffer<ffi::F16> kzero, ffi::Buffer<ffi::U8> vcodes,
                          ffi::Buffer<ffi::F16> vscale, ffi::Buffer<ffi::F16> vzero, ffi::Buffer<ffi::S32> bounds,
                          int64_t bits, int64_t group, ffi::ResultBuffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> den,
                          ffi::ResultBuffer<ffi::F32> acc) {
  const auto qd = q.dimensions();
  const auto cd = kcodes.dimensions();
  if (qd.size() != 4 || cd.size() != 4) return ffi::Error::InvalidArgument("q and kcodes must have rank 4");
  const int64_t b = qd[0], kvh = qd[1], r = qd[2], hd = qd[3], cap = cd[1];
  if (bits != 2 && bits != 4) return ffi::Error::InvalidArgument("bits must be 2 or 4");
  if (group <= 0 || hd % group != 0 || cap % group != 0 || group % (8 / bits) != 0)
    return ffi::Error::InvalidArgument("group must divide head_dim and the capacity");
  if (cd[0] != b || cd[2] != kvh || cd[3] != hd * bits / 8)
    return ffi::Error::InvalidArgument("kcodes does not match q, bits and head_dim");
  const Head head = bits == 4 ? pick<4>(hd, group) : pick<2>(hd, group);
  if (head == nullptr) return ffi::Error::InvalidArgument("head_dim must be 64 or 128 and group 32 or 64");
  const int32_t* bd = bounds.typed_data();
  const int64_t lo = std::max<int64_t>(bd[0], 0), hi = std::max(lo, std::min<int64_t>(bd[1], cap));
  const uint8_t* kc = kcodes.typed_data();
  const uint8_t* vc = vcodes.typed_data();
  const auto* ks = reinterpret_cast<const uint16_t*>(kscale.typed_data());
  const auto* kz = reinterpret_cast<const uint16_t*>(kzero.typed_data());
  const auto* vs = reinterpret_cast<const uint16_t*>(vscale.typed_data());
  const auto* vz = reinterpret_cast<const uint16_t*>(vzero.typed_data());
  const int64_t w = hd * bits / 8, rows = b * kvh * r;

  // the range in chunks of whole groups, at least kMinChunk positions, one per thread
  constexpr int64_t kMinChunk = 1024;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per = std::max(kMinChunk, ((hi - lo + threads - 1) / threads + group - 1) / group * group);
  const int64_t total = std::max<int64_t>(1, (hi - lo + per - 1) / per);
  std::vector<float> pm(total * rows), pden(total * rows), pacc(total * rows * hd);
  auto work = std::make_shared<Chunks>();
  work->total = total;
  work->run = [&](int64_t c) {
    const int64_t c_lo = lo + c * per, c_hi = std::min(hi, c_lo + per);
    for (int64_t bi = 0; bi < b; ++bi)
      for (int64_t h = 0; h < kvh; ++h) {
        const int64_t code_off = bi * cap * kvh * w + h * w;
        const int64_t kside_off = bi * (cap / group) * kvh * hd + h * hd;
        const int64_t vside_off = bi * cap * kvh * (hd / group) + h * (hd / group);
        const int64_t row = (bi * kvh + h) * r;
        head(q.typed_data() + row * hd, kc + code_off, ks + kside_off, kz + kside_off, vc + code_off,
             vs + vside_off, vz + vside_off, c_lo, std::max(c_hi, c_lo), kvh, r, pm.data() + c * rows + row,
             pden.data() + c * rows + row, pacc.data() + (c * rows + row) * hd);
      }
  };
  for (int64_t t = 1; t < std::min(threads, total); ++t) pool.Schedule([work] { drain(work); });
  drain(work);
  {
    std::unique_lock<std::mutex> lock(work->mu);
    work->finished.wait(lock, [&] { return work->done.load() == total; });
  }
  // join the chunks' softmax statistics: rescale each to the largest maximum (NaN stays NaN)
  for (int64_t i = 0; i < rows; ++i) {
    float top = -FLT_MAX;
    for (int64_t c = 0; c < total; ++c) {
      const float mc = pm[c * rows + i];
      top = mc != mc ? NAN : std::max(top, mc);
    }
    float sum_den = 0.0f;
    float* out = acc->typed_data() + i * hd;
    std::fill(out, out + hd, 0.0f);
    for (int64_t c = 0; c < total; ++c) {
      const float f = total == 1 ? 1.0f : std::exp(pm[c * rows + i] - top);
      sum_den += f * pden[c * rows + i];
      for (int64_t d = 0; d < hd; ++d) out[d] += f * pacc[(c * rows + i) * hd + d];
    }
    m->typed_data()[i] = top;
    den->typed_data()[i] = sum_den;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KiviAttend, KiviAttendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
