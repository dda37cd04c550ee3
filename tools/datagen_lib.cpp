#include "tools/datagen_lib.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "common/assert.hpp"

namespace lottery::datagen {
namespace {

// Independent streams of one agency, each consumed at a fixed rate per bet,
// so that asking for a different number of winners changes only the numbers
// of the bets that win: names, documents and birthdates stay put.
enum class Stream : uint64_t { people = 1, documents = 2, default_winners = 3, winner_positions = 4, numbers = 5 };

uint64_t stream_seed(uint64_t seed, uint16_t agency, Stream stream) {
  SplitMix64 mix(seed);
  uint64_t a = mix.next();
  SplitMix64 mix2(a ^ (uint64_t{agency} << 32) ^ static_cast<uint64_t>(stream));
  return mix2.next();
}

inline uint64_t rotl(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

// Feistel halves: 2 x 14 bits = 28 bits, the smallest even split above 90M.
constexpr unsigned feistel_half_bits = 14;
constexpr uint64_t feistel_half_mask = (uint64_t{1} << feistel_half_bits) - 1;
static_assert((uint64_t{1} << (2 * feistel_half_bits)) >= document_count);

constexpr std::string_view female_names[] = {
    "María",    "Ana",      "Lucía",    "Sofía",   "Valentina", "Martina", "Camila",   "Julieta",  "Florencia",
    "Agustina", "Milagros", "Carolina", "Natalia", "Gabriela",  "Romina",  "Paula",    "Victoria", "Catalina",
    "Josefina", "Micaela",  "Rocío",    "Belén",   "Daniela",   "Lorena",  "Silvia",   "Mónica",   "Graciela",
    "Beatriz",  "Inés",     "Mercedes", "Noelia",  "Verónica",  "Soledad", "Celeste",  "Abril",    "Guadalupe",
    "Luján",    "Ángeles",  "Dolores",  "Pilar",   "Elena",     "Rosa",    "Teresa",   "Marta",    "Norma",
    "Susana",   "Andrea",   "Eugenia",  "Jimena",  "Azul",      "Candela", "Antonela", "Brenda",   "Ximena"};
constexpr std::string_view male_names[] = {
    "Juan",      "José",      "Carlos",   "Luis",   "Jorge",       "Miguel",  "Martín",  "Santiago", "Matías",
    "Nicolás",   "Sebastián", "Agustín",  "Tomás",  "Joaquín",     "Facundo", "Lautaro", "Franco",   "Ignacio",
    "Lucas",     "Mateo",     "Benjamín", "Thiago", "Emiliano",    "Gonzalo", "Diego",   "Pablo",    "Andrés",
    "Alejandro", "Fernando",  "Gustavo",  "Ramón",  "Héctor",      "Raúl",    "Rubén",   "Sergio",   "Ricardo",
    "Marcelo",   "Hernán",    "Germán",   "Julián", "Maximiliano", "Rodrigo", "Leandro", "Ezequiel", "Iván",
    "Óscar",     "Adrián",    "Damián",   "Darío",  "Cristian",    "Esteban", "Víctor",  "Ulises",   "Valentín"};
// Compound names as people really carry them, beyond random pairs.
constexpr std::string_view compound_names[] = {"María José",
                                               "Juan Pablo",
                                               "María Laura",
                                               "Juan Manuel",
                                               "Ana María",
                                               "José Luis",
                                               "María Eugenia",
                                               "Juan Cruz",
                                               "María Belén",
                                               "Luis Alberto",
                                               "María de los Ángeles",
                                               "Juan Ignacio",
                                               "María Sol",
                                               "José María",
                                               "Ana Paula",
                                               "Juan Martín",
                                               "María Florencia",
                                               "Carlos Alberto"};
constexpr std::string_view last_names[] = {
    "García",   "Rodríguez", "González",   "Fernández", "López",        "Martínez",  "Pérez",     "Gómez",    "Sánchez",
    "Díaz",     "Álvarez",   "Romero",     "Sosa",      "Torres",       "Ruiz",      "Ramírez",   "Flores",   "Acosta",
    "Benítez",  "Medina",    "Suárez",     "Herrera",   "Aguirre",      "Giménez",   "Gutiérrez", "Pereyra",  "Molina",
    "Castro",   "Ortiz",     "Núñez",      "Rojas",     "Domínguez",    "Fornerón",  "Ibáñez",    "Muñoz",    "Peña",
    "Vázquez",  "Cabrera",   "Ríos",       "Quiroga",   "Méndez",       "Ledesma",   "Godoy",     "Villalba", "Córdoba",
    "Rossi",    "Russo",     "Ferrari",    "Bianchi",   "Romano",       "Colombo",   "Bruno",     "Greco",    "Lorca",
    "Zambrano", "Rivera",    "Echeverría", "Iturralde", "De la Fuente", "Del Valle", "Mansilla",  "Ojeda"};

// Name shapes, out of 100: a curated compound, a random pair, else one name.
constexpr uint64_t compound_percent = 8;
constexpr uint64_t pair_percent = 15;
constexpr uint64_t double_surname_percent = 15;

template <size_t N>
std::string_view pick(Xoshiro256& rng, const std::string_view (&list)[N]) {
  return list[rng.below(N)];
}

// Appends to a fixed line buffer; every line is far below its size.
class LineBuilder {
 public:
  void text(std::string_view s) {
    LOTTERY_ASSERT(_used + s.size() <= sizeof _buf);
    std::memcpy(_buf + _used, s.data(), s.size());
    _used += s.size();
  }
  void ch(char c) { text(std::string_view(&c, 1)); }
  void number(uint64_t v, int width = 0) {
    char tmp[24];
    auto r = std::to_chars(tmp, tmp + sizeof tmp, v);
    for (int pad = width - static_cast<int>(r.ptr - tmp); pad > 0; pad--) ch('0');
    text(std::string_view(tmp, static_cast<size_t>(r.ptr - tmp)));
  }
  std::string_view view() const { return {_buf, _used}; }
  size_t size() const { return _used; }

 private:
  char _buf[512];
  size_t _used = 0;
};

void append_first_name(Xoshiro256& rng, LineBuilder& line) {
  uint64_t shape = rng.below(100);
  if (shape < compound_percent) {
    line.text(pick(rng, compound_names));
    return;
  }
  bool female = rng.below(2) == 0;
  std::string_view first = female ? pick(rng, female_names) : pick(rng, male_names);
  line.text(first);
  if (shape < compound_percent + pair_percent) {
    std::string_view second = female ? pick(rng, female_names) : pick(rng, male_names);
    if (second != first) {
      line.ch(' ');
      line.text(second);
    }
  }
}

void append_last_name(Xoshiro256& rng, LineBuilder& line) {
  line.text(pick(rng, last_names));
  if (rng.below(100) < double_surname_percent) {
    line.ch(' ');
    line.text(pick(rng, last_names));
  }
}

void append_birthdate(Xoshiro256& rng, LineBuilder& line) {
  static constexpr uint8_t days_in_month[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  uint64_t year = birth_year_first + rng.below(birth_year_last - birth_year_first + 1);
  uint64_t month = 1 + rng.below(12);
  bool leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
  uint64_t days = days_in_month[month - 1] + (month == 2 && leap ? 1 : 0);
  uint64_t day = 1 + rng.below(days);
  line.number(year, 4);
  line.ch('-');
  line.number(month, 2);
  line.ch('-');
  line.number(day, 2);
}

// A number other than the winning one, uniform over the 9999 others.
uint16_t losing_number(Xoshiro256& rng, uint16_t winning) {
  auto n = static_cast<uint16_t>(rng.below(9999));
  return n >= winning ? static_cast<uint16_t>(n + 1) : n;
}

// Writes to a file through a large buffer; the first error sticks and is
// reported by finish(), since ByteSink::append has no error path.
class FileSink final : public ByteSink {
 public:
  explicit FileSink(int fd) : _fd(fd) { _buf.reserve(write_buffer_bytes); }
  FileSink(const FileSink&) = delete;
  FileSink& operator=(const FileSink&) = delete;
  ~FileSink() override {
    if (_fd >= 0) ::close(_fd);
  }

  void append(std::string_view bytes) override {
    if (_buf.size() + bytes.size() > write_buffer_bytes) flush();
    _buf.append(bytes);
  }

  common::Status finish(const std::string& path) {
    flush();
    if (_error == 0 && ::fsync(_fd) != 0) _error = errno;
    int fd = _fd;
    _fd = -1;
    if (::close(fd) != 0 && _error == 0) _error = errno;
    if (_error != 0) return common::Error::from_errno(("write " + path).c_str(), _error);
    return common::ok_status();
  }

 private:
  void flush() {
    const char* p = _buf.data();
    size_t left = _buf.size();
    while (left > 0 && _error == 0) {
      ssize_t n = ::write(_fd, p, left);
      if (n < 0) {
        if (errno == EINTR) continue;
        _error = errno;
        break;
      }
      p += n;
      left -= static_cast<size_t>(n);
    }
    _buf.clear();
  }

  int _fd;
  int _error = 0;
  std::string _buf;
};

// Writes `produce(sink)` to `path` through a temporary file and a rename.
template <typename Produce>
common::Status write_file_atomically(const std::string& path, Produce&& produce) {
  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return common::Error::from_errno(("open " + tmp).c_str());
  FileSink sink(fd);
  produce(sink);
  if (auto st = sink.finish(tmp); !st.ok()) {
    ::unlink(tmp.c_str());
    return st;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return common::Error::from_errno(("rename " + tmp + " to " + path).c_str(), err);
  }
  return common::ok_status();
}

}  // namespace

// ------------------------------------------------------------------ PRNGs

uint64_t SplitMix64::next() {
  uint64_t z = (_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

Xoshiro256::Xoshiro256(uint64_t seed) {
  SplitMix64 mix(seed);
  for (uint64_t& s : _s) s = mix.next();
}

uint64_t Xoshiro256::next() {
  uint64_t result = rotl(_s[1] * 5, 7) * 9;
  uint64_t t = _s[1] << 17;
  _s[2] ^= _s[0];
  _s[3] ^= _s[1];
  _s[1] ^= _s[2];
  _s[0] ^= _s[3];
  _s[2] ^= t;
  _s[3] = rotl(_s[3], 45);
  return result;
}

uint64_t Xoshiro256::below(uint64_t n) {
  LOTTERY_ASSERT(n > 0);
  __uint128_t m = static_cast<__uint128_t>(next()) * n;
  auto low = static_cast<uint64_t>(m);
  if (low < n) {
    uint64_t threshold = (0 - n) % n;  // 2^64 mod n
    while (low < threshold) {
      m = static_cast<__uint128_t>(next()) * n;
      low = static_cast<uint64_t>(m);
    }
  }
  return static_cast<uint64_t>(m >> 64);
}

DocumentPermutation::DocumentPermutation(uint64_t key) {
  SplitMix64 mix(key);
  for (uint32_t& k : _keys) k = static_cast<uint32_t>(mix.next());
}

uint64_t DocumentPermutation::feistel(uint64_t x) const {
  uint64_t left = x >> feistel_half_bits;
  uint64_t right = x & feistel_half_mask;
  for (uint32_t k : _keys) {
    uint64_t z = ((right << 32) | k) * 0x9E3779B97F4A7C15ull;
    z ^= z >> 29;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 32;
    uint64_t next_right = left ^ (z & feistel_half_mask);
    left = right;
    right = next_right;
  }
  return (left << feistel_half_bits) | right;
}

uint64_t DocumentPermutation::permute(uint64_t index) const {
  LOTTERY_ASSERT(index < document_count);
  // Cycle walking: the Feistel network permutes [0, 2^28); stepping until the
  // value lands below document_count permutes [0, document_count).
  uint64_t x = feistel(index);
  while (x >= document_count) x = feistel(x);
  return x;
}

// ------------------------------------------------------------------ generation

uint64_t default_winners(uint64_t seed, uint16_t agency, uint64_t bets) {
  Xoshiro256 rng(stream_seed(seed, agency, Stream::default_winners));
  uint64_t k = rng.below(default_winners_max + 1);
  return k < bets ? k : bets;
}

AgencyResult generate_agency(const GeneratorOptions& options, const AgencySpec& spec, ByteSink& out) {
  LOTTERY_ASSERT(spec.winners <= spec.bets);
  LOTTERY_ASSERT(spec.bets <= bets_per_agency_max);
  LOTTERY_ASSERT(options.winning_number <= 9999);
  Xoshiro256 people(stream_seed(options.seed, spec.agency, Stream::people));
  Xoshiro256 positions(stream_seed(options.seed, spec.agency, Stream::winner_positions));
  Xoshiro256 numbers(stream_seed(options.seed, spec.agency, Stream::numbers));
  DocumentPermutation documents(stream_seed(options.seed, spec.agency, Stream::documents));
  std::string_view eol = options.crlf ? "\r\n" : "\n";

  AgencyResult result;
  result.agency = spec.agency;
  result.bets = spec.bets;
  result.winners = spec.winners;
  result.winner_documents.reserve(spec.winners);
  uint64_t winners_left = spec.winners;
  for (uint64_t i = 0; i < spec.bets; i++) {
    // Selection sampling (Knuth's algorithm S): exactly `winners` positions,
    // each subset equally likely, in one pass with no memory.
    bool winner = positions.below(spec.bets - i) < winners_left;
    // Drawn for every bet, winner or not, to keep the stream in step.
    uint16_t number = losing_number(numbers, options.winning_number);
    if (winner) number = options.winning_number;
    LineBuilder line;
    append_first_name(people, line);
    line.ch(',');
    append_last_name(people, line);
    line.ch(',');
    size_t doc_at = line.size();
    line.number(document_first + documents.permute(i));
    std::string_view document = line.view().substr(doc_at);
    line.ch(',');
    append_birthdate(people, line);
    line.ch(',');
    line.number(number);
    line.text(eol);
    if (winner) {
      winners_left--;
      result.winner_documents.emplace_back(document);
    }
    out.append(line.view());
  }
  LOTTERY_ASSERT(winners_left == 0);
  return result;
}

std::string expected_json(uint16_t winning_number, const std::vector<AgencyResult>& agencies) {
  // Documents are digits and keys are numbers: nothing needs escaping.
  // Built with append() only: GCC 12 reports a false -Wrestrict on chains of
  // std::string operator+ with literals.
  std::string out;
  out.append("{\"winning_number\":").append(std::to_string(winning_number)).append(",\"agencies\":{");
  uint64_t total = 0;
  for (size_t i = 0; i < agencies.size(); i++) {
    const AgencyResult& a = agencies[i];
    if (i > 0) out.append(",");
    out.append("\"").append(std::to_string(a.agency)).append("\":{\"bets\":").append(std::to_string(a.bets));
    out.append(",\"winners\":").append(std::to_string(a.winners)).append(",\"winner_documents\":[");
    for (size_t d = 0; d < a.winner_documents.size(); d++) {
      if (d > 0) out.append(",");
      out.append("\"").append(a.winner_documents[d]).append("\"");
    }
    out.append("]}");
    total += a.bets;
  }
  out.append("},\"total_bets\":").append(std::to_string(total)).append("}\n");
  return out;
}

std::string agency_file_name(uint16_t agency) {
  return "agency-" + std::to_string(agency) + ".csv";
}

common::Result<std::vector<AgencyResult>> write_dataset(const DatasetOptions& options) {
  std::error_code ec;
  std::filesystem::create_directories(options.out_dir, ec);
  if (ec) return common::Error::make(ec.value(), "create directory " + options.out_dir + ": " + ec.message());

  std::vector<AgencyResult> results;
  results.reserve(options.agencies.size());
  for (const AgencySpec& spec : options.agencies) {
    std::string path = options.out_dir + "/" + agency_file_name(spec.agency);
    AgencyResult result;
    auto st =
        write_file_atomically(path, [&](ByteSink& sink) { result = generate_agency(options.generator, spec, sink); });
    if (!st.ok()) return st.error();
    results.push_back(std::move(result));
  }
  std::string json = expected_json(options.generator.winning_number, results);
  auto st = write_file_atomically(options.out_dir + "/expected.json", [&](ByteSink& sink) { sink.append(json); });
  if (!st.ok()) return st.error();
  return results;
}

}  // namespace lottery::datagen
