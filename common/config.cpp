#include "common/config.hpp"

#include <ini.h>
#include <sys/stat.h>
#include <yaml-cpp/yaml.h>

#include <cstdlib>
#include <cstring>

namespace common::config {

std::optional<std::string> prescan_flag(int argc, char** argv, std::string_view name) {
  for (int i = 1; i < argc; i++) {
    std::string_view a = argv[i];
    if (a == name && i + 1 < argc) return std::string(argv[i + 1]);
    if (a.size() > name.size() && a.substr(0, name.size()) == name && a[name.size()] == '=')
      return std::string(a.substr(name.size() + 1));
  }
  return std::nullopt;
}

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

static bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

Result<std::map<std::string, std::string>> load_ini(const std::string& path, bool optional) {
  std::map<std::string, std::string> out;
  if (!file_exists(path)) {
    if (optional) return out;
    return Error::make(ENOENT, "config file " + path + " does not exist");
  }
  // inih's C parser calls us once per key; [DEFAULT] keys are also stored bare,
  // the way Python's configparser exposes them.
  auto handler = [](void* user, const char* section, const char* name, const char* value) -> int {
    auto& map = *static_cast<std::map<std::string, std::string>*>(user);
    std::string upper_key;
    for (const char* c = name; *c; c++) upper_key.push_back(static_cast<char>(*c >= 'a' && *c <= 'z' ? *c - 32 : *c));
    std::string sec(section);
    map[sec + "." + upper_key] = value;
    if (sec == "DEFAULT") map[upper_key] = value;
    return 1;
  };
  int rc = ini_parse(path.c_str(), handler, &out);
  if (rc != 0) {
    if (rc < 0) return Error::make(EIO, "config file " + path + ": cannot be read");
    return Error::make(EINVAL, "config file " + path + ": parse error at line " + std::to_string(rc));
  }
  return out;
}

static void flatten(const YAML::Node& node, const std::string& prefix, std::map<std::string, std::string>& out) {
  if (node.IsMap()) {
    for (const auto& kv : node) {
      std::string key = kv.first.as<std::string>();
      flatten(kv.second, prefix.empty() ? key : prefix + "." + key, out);
    }
  } else if (node.IsScalar()) {
    out[prefix] = node.as<std::string>();
  }
}

Result<std::map<std::string, std::string>> load_yaml(const std::string& path, bool optional) {
  std::map<std::string, std::string> out;
  if (!file_exists(path)) {
    if (optional) return out;
    return Error::make(ENOENT, "config file " + path + " does not exist");
  }
  try {
    YAML::Node root = YAML::LoadFile(path);
    flatten(root, "", out);
  } catch (const YAML::Exception& e) {
    return Error::make(EINVAL, "config file " + path + ": " + e.what());
  }
  return out;
}

}  // namespace common::config
