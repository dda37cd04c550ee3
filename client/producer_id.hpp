// Stable producer ids for HELLO (docs/PROTOCOL.md, "Exactly once").
//
// The server resumes a producer's stream by its id, so the id must come out
// the same whenever the same agency re-runs on the same input (a restarted
// container, a re-run after a crash) and differ for any other input. It is a
// 64-bit FNV-1a hash of a tagged, length-prefixed tuple: the same tuple always
// gives the same id, on any machine and build, and no two different tuples
// share an encoding.
//
// Changing the encoding changes every id, which makes every earlier stream
// look new to the server (its bets would be sent again): tests pin one value.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/result.hpp"
#include "lottery/protocol.hpp"

namespace lottery::client {

// The agency's file, named by its canonical absolute path (see canonical_path):
// "./data.csv" and "/srv/data.csv" are the same producer.
uint64_t file_producer_id(uint16_t agency, std::string_view canonical_file_path);

// Single-bet mode: the bet itself is the stream, so re-sending the same bet is
// a retry, not a second bet.
uint64_t bet_producer_id(uint16_t agency, const proto::Bet& bet);

// realpath(3): absolute, with symlinks, "." and ".." resolved. Errors name the
// path.
common::Result<std::string> canonical_path(const std::string& path);

}  // namespace lottery::client
