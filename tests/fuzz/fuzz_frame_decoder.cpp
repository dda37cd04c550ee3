// libFuzzer target: the frame decoder, the first code to read bytes from the
// network on both sides. The input is a byte stream as a peer would send it:
// frames are cut from it the way the server's session does (length prefix
// first), and every frame is offered to each request and reply decoder. No
// input may crash, read out of bounds, or make a decoder hand back a view
// outside its frame.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "lottery/limits.hpp"
#include "lottery/protocol.hpp"

namespace {

using namespace lottery;

void inside(std::string_view v, const std::byte* begin, const std::byte* end) {
  auto p = reinterpret_cast<const std::byte*>(v.data());
  if (!v.empty() && (p < begin || p + v.size() > end)) __builtin_trap();
}

void decode_as_reply(proto::Bytes frame) {
  proto::Reply r;
  if (!proto::decode_reply(frame, r)) return;
  if (r.header.length != frame.size()) __builtin_trap();
  const std::byte* end = frame.data() + frame.size();
  inside(r.reason, frame.data(), end);
  if (r.status != proto::Status::ok && r.reason.size() > limits::frame_bytes_max) __builtin_trap();
  proto::HelloAck hello;
  (void)proto::decode_hello_ack(r, hello);
  uint16_t count = 0;
  (void)proto::decode_batch_ack(r, count);
  uint64_t stored = 0;
  (void)proto::decode_finished_ack(r, stored);
  proto::WinnersPage page;
  if (proto::decode_winners_page(r, page)) {
    // A page that decodes has exactly `count` documents, all inside it.
    proto::Bytes cursor = page.documents;
    std::string_view doc;
    for (uint32_t i = 0; i < page.count; i++) {
      if (!proto::next_document(cursor, doc)) __builtin_trap();
      inside(doc, frame.data(), end);
    }
    if (!cursor.empty()) __builtin_trap();
  }
}

void decode_as_request(const proto::FrameHeader& h, proto::Bytes body) {
  proto::HelloRequest hello;
  if (proto::decode_hello(body, hello) && body.size() != 12) __builtin_trap();
  uint16_t agency = 0;
  uint32_t start = 0;
  (void)proto::decode_agency_body(body, agency);
  (void)proto::decode_winners_query(body, agency, start);
  if (h.type == static_cast<uint8_t>(proto::MsgType::batch)) {
    proto::BatchInfo info;
    proto::ValidationContext ctx{static_cast<uint16_t>(1 + h.seq % limits::agencies_max), proto::Date{2026, 6, 1}};
    auto rejection = proto::validate_batch(body, ctx, info);
    if (rejection && rejection->index != proto::no_bet_index && rejection->index >= info.count) __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto stream = reinterpret_cast<const std::byte*>(data);
  size_t used = 0;
  while (size - used >= 4) {
    proto::FrameHeader h;
    auto check = proto::parse_header(stream + used, size - used, limits::frame_bytes_max, h);
    if (check == proto::HeaderCheck::need_more) break;
    if (check != proto::HeaderCheck::ok) {
      // The session refuses the frame; the length checks come first.
      if (check == proto::HeaderCheck::too_large && h.length <= limits::frame_bytes_max) __builtin_trap();
      if (check == proto::HeaderCheck::bad_length && h.length >= limits::frame_header_bytes) __builtin_trap();
      break;
    }
    if (h.length < limits::frame_header_bytes || h.length > limits::frame_bytes_max) __builtin_trap();
    if (size - used < h.length) break;
    proto::Bytes frame(stream + used, h.length);
    proto::Bytes body = frame.subspan(limits::frame_header_bytes);
    decode_as_reply(frame);
    if (proto::body_crc_matches(h, body)) decode_as_request(h, body);
    // Also as if the checksum were right, so the fuzzer need not forge CRCs.
    decode_as_request(h, body);
    used += h.length;
  }
  return 0;
}
