#include "fastdcp/format/checksum.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

namespace fastdcp {
namespace {

// Bit-at-a-time CRC32C: the definition, to check the fast implementations against.
uint32_t reference_crc32c(const unsigned char* p, size_t n, uint32_t crc = 0) {
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return ~crc;
}

TEST(Crc32c, MatchesTheStandardCheckValue) {
  const std::string check = "123456789";
  EXPECT_EQ(crc32c(check.data(), check.size()), 0xE3069283u) << crc32c_implementation();
  EXPECT_EQ(crc32c(nullptr, 0), 0u);
}

TEST(Crc32c, MatchesTheDefinitionOnRandomData) {
  std::mt19937 rng(7);
  std::vector<unsigned char> data(1 << 16);
  for (auto& b : data) b = static_cast<unsigned char>(rng());
  for (size_t size : {1u, 7u, 8u, 9u, 63u, 64u, 65u, 4095u, 65536u}) {
    const size_t start = rng() % 16;
    const size_t n = std::min(size, data.size() - start);
    EXPECT_EQ(crc32c(data.data() + start, n), reference_crc32c(data.data() + start, n)) << size;
  }
}

TEST(Crc32c, ContinuesAcrossPieces) {
  std::vector<unsigned char> data(10000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<unsigned char>(i * 31 + 7);
  const uint32_t whole = crc32c(data.data(), data.size());
  const uint32_t first = crc32c(data.data(), 3333);
  EXPECT_EQ(crc32c(data.data() + 3333, data.size() - 3333, first), whole);
}

}  // namespace
}  // namespace fastdcp
