// Layered configuration: flag > environment variable > config file > default.
//
// Flags and environment variables are handled by CLI11 (each option names its
// environment variable). The config file is read first, and its values become
// the options' defaults, so the precedence falls out of the layering.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <string_view>

#include "common/result.hpp"

namespace common::config {

// Finds `--name VALUE` or `--name=VALUE` in argv without consuming it, so the
// config file can be loaded before the full command line is parsed.
std::optional<std::string> prescan_flag(int argc, char** argv, std::string_view name);

// Flat key/value view of a config file: INI keys as "SECTION.KEY" (and, for the
// [DEFAULT] section, also bare "KEY"); YAML scalars as dotted paths
// ("server.address"). A missing file is not an error when `optional` is true.
Result<std::map<std::string, std::string>> load_ini(const std::string& path, bool optional);
Result<std::map<std::string, std::string>> load_yaml(const std::string& path, bool optional);

// Value from the environment, if set and non-empty.
std::optional<std::string> env(const char* name);

}  // namespace common::config
