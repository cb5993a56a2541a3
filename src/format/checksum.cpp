#include "fastdcp/format/checksum.h"

#include <array>
#include <cstring>

#if defined(FASTDCP_HAVE_ISAL)
#include <isa-l/crc.h>
#endif
#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace fastdcp {
namespace {

constexpr uint32_t kPolynomial = 0x82F63B78u;  // reflected Castagnoli

constexpr std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPolynomial : c >> 1;
    table[i] = c;
  }
  return table;
}
constexpr auto kTable = make_table();

uint32_t crc32c_table(const unsigned char* p, size_t n, uint32_t crc) noexcept {
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = kTable[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(const unsigned char* p, size_t n, uint32_t crc) noexcept {
  uint64_t c = ~crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    c = _mm_crc32_u64(c, word);
  }
  auto c32 = static_cast<uint32_t>(c);
  for (; n > 0; --n, ++p) c32 = _mm_crc32_u8(c32, *p);
  return ~c32;
}
#endif

enum class Impl { kIsal, kSse42, kTable };

Impl pick() noexcept {
#if defined(FASTDCP_HAVE_ISAL)
  return Impl::kIsal;
#elif defined(__x86_64__)
  return __builtin_cpu_supports("sse4.2") ? Impl::kSse42 : Impl::kTable;
#else
  return Impl::kTable;
#endif
}

const Impl kImpl = pick();

}  // namespace

uint32_t crc32c(const void* data, size_t size, uint32_t crc) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
  switch (kImpl) {
#if defined(FASTDCP_HAVE_ISAL)
    case Impl::kIsal:
      // ISA-L takes an int length and works on the uninverted register.
      while (size > 0) {
        const size_t piece = size < (size_t{1} << 30) ? size : (size_t{1} << 30);
        crc = ~crc32_iscsi(const_cast<unsigned char*>(p), static_cast<int>(piece), ~crc);
        p += piece;
        size -= piece;
      }
      return crc;
#endif
#if defined(__x86_64__)
    case Impl::kSse42: return crc32c_sse42(p, size, crc);
#endif
    default: return crc32c_table(p, size, crc);
  }
}

const char* crc32c_implementation() noexcept {
  switch (kImpl) {
    case Impl::kIsal: return "isa-l";
    case Impl::kSse42: return "sse4.2";
    default: return "table";
  }
}

}  // namespace fastdcp
