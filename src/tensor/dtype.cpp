#include "fastdcp/tensor/dtype.h"

#include <array>

namespace fastdcp {
namespace {
struct DTypeInfo {
  std::string_view name;
  int bits;
};
constexpr std::array<DTypeInfo, kNumDTypes> kInfo = {{
    {"BOOL", 8},        {"F4", 4},         {"F6_E2M3", 6},     {"F6_E3M2", 6},     {"U8", 8},
    {"I8", 8},          {"F8_E5M2", 8},    {"F8_E4M3", 8},     {"F8_E8M0", 8},     {"F8_E4M3FNUZ", 8},
    {"F8_E5M2FNUZ", 8}, {"I16", 16},       {"U16", 16},        {"F16", 16},        {"BF16", 16},
    {"I32", 32},        {"U32", 32},       {"F32", 32},        {"C64", 64},        {"F64", 64},
    {"I64", 64},        {"U64", 64},       {"C128", 128},
}};
}  // namespace

int dtype_bits(DType dtype) noexcept { return kInfo[static_cast<size_t>(dtype)].bits; }

std::string_view dtype_name(DType dtype) noexcept { return kInfo[static_cast<size_t>(dtype)].name; }

std::optional<DType> dtype_from_name(std::string_view name) noexcept {
  for (size_t i = 0; i < kInfo.size(); ++i) {
    if (kInfo[i].name == name) return static_cast<DType>(i);
  }
  return std::nullopt;
}

uint64_t dtype_storage_bytes(DType dtype, uint64_t numel) noexcept {
  return (numel * static_cast<uint64_t>(dtype_bits(dtype)) + 7) / 8;
}

}  // namespace fastdcp
