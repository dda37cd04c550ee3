#include "server/metrics.hpp"

#include <cstring>
#include <string_view>

namespace server {

namespace {
// A request line and a few headers; anything longer is not a scraper.
constexpr size_t request_bytes_max = 8192;
}  // namespace

std::string render_metrics(const lottery::control::Control& control, unsigned workers) {
  const auto& l = control.layout();
  std::string out;
  out.reserve(4096);
  auto family = [&](const char* name, const char* type, const char* help) {
    out += "# HELP ";
    out += name;
    out += ' ';
    out += help;
    out += "\n# TYPE ";
    out += name;
    out += ' ';
    out += type;
    out += '\n';
  };
  auto sample = [&](const char* name, const char* label, uint64_t label_value, uint64_t value) {
    out += name;
    if (label != nullptr) {
      out += '{';
      out += label;
      out += "=\"";
      out += std::to_string(label_value);
      out += "\"}";
    }
    out += ' ';
    out += std::to_string(value);
    out += '\n';
  };
  struct Counter {
    const char* name;
    const char* type;
    const char* help;
    const std::atomic<uint64_t> lottery::control::WorkerSlot::*field;
  };
  static const Counter counters[] = {
      {"lottery_connections_total", "counter", "Connections accepted by the worker.",
       &lottery::control::WorkerSlot::connections_total},
      {"lottery_connections_open", "gauge", "Connections open on the worker.",
       &lottery::control::WorkerSlot::connections_open},
      {"lottery_batches_total", "counter", "Batches stored by the worker.", &lottery::control::WorkerSlot::batches},
      {"lottery_bets_total", "counter", "Bets stored by the worker.", &lottery::control::WorkerSlot::bets},
      {"lottery_errors_total", "counter", "Rejected batches and protocol errors on the worker.",
       &lottery::control::WorkerSlot::errors},
      {"lottery_worker_restarts_total", "counter", "Times the master restarted the worker.",
       &lottery::control::WorkerSlot::restarts},
      {"lottery_store_syncs_total", "counter", "Store syncs (msync) for durability group/always.",
       &lottery::control::WorkerSlot::syncs},
      {"lottery_duplicate_batches_total", "counter", "Resent batches acknowledged without storing them again.",
       &lottery::control::WorkerSlot::duplicates},
      {"lottery_connections_refused_total", "counter", "Connections refused over a connection cap.",
       &lottery::control::WorkerSlot::connections_refused},
      {"lottery_connections_timed_out_total", "counter",
       "Connections closed by the handshake deadline or the idle timeout.",
       &lottery::control::WorkerSlot::connections_timed_out},
      {"lottery_connections_dropped_total", "counter", "Connections dropped for not reading their replies.",
       &lottery::control::WorkerSlot::connections_dropped},
  };
  for (const Counter& c : counters) {
    family(c.name, c.type, c.help);
    for (unsigned w = 0; w < workers; w++) sample(c.name, "worker", w, (l.workers[w].*c.field).load());
  }
  family("lottery_worker_up", "gauge", "1 while the worker process is serving.");
  for (unsigned w = 0; w < workers; w++) sample("lottery_worker_up", "worker", w, l.workers[w].alive.load());
  family("lottery_agency_bets_stored", "gauge", "Bets stored per agency, all workers.");
  for (uint32_t a = 1; a <= control.agencies(); a++) sample("lottery_agency_bets_stored", "agency", a, control.bets_stored(a));
  family("lottery_agency_finished", "gauge", "1 once the agency said it finished.");
  for (uint32_t a = 1; a <= control.agencies(); a++) sample("lottery_agency_finished", "agency", a, control.finished(a));
  family("lottery_agency_closed_out", "gauge", "1 if the betting closed before the agency finished.");
  for (uint32_t a = 1; a <= control.agencies(); a++)
    sample("lottery_agency_closed_out", "agency", a, control.closed_out(a));
  family("lottery_draw_state", "gauge", "0 open, 1 drawing (betting closed), 2 done.");
  sample("lottery_draw_state", nullptr, 0, l.draw_state.load());
  family("lottery_draw_winners", "gauge", "Winning bets found by the draw.");
  sample("lottery_draw_winners", nullptr, 0, l.draw_winners.load());
  return out;
}

MetricsHttp::MetricsHttp(reactor::Reactor& loop, const lottery::control::Control& control, unsigned workers,
                         size_t /*max_conns*/)
    : _loop(loop), _control(control), _workers(workers) {}

void MetricsHttp::on_open(reactor::ConnId id) { _pending.erase(id.slot); }
void MetricsHttp::on_close(reactor::ConnId id, reactor::CloseReason) { _pending.erase(id.slot); }

void MetricsHttp::respond(reactor::ConnId id, int status, std::string_view content_type, const std::string& body) {
  std::string head = "HTTP/1.1 " + std::to_string(status) + (status == 200 ? " OK" : status == 404 ? " Not Found" : " Bad Request") +
                     "\r\nContent-Type: " + std::string(content_type) +
                     "\r\nContent-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n";
  _pending[id.slot] = Pending{head + body, 0};
  if (pump(id)) _loop.close(id, reactor::Reactor::Flush::yes);
}

bool MetricsHttp::pump(reactor::ConnId id) {
  Pending& p = _pending[id.slot];
  while (p.sent < p.bytes.size()) {
    size_t n = std::min(p.bytes.size() - p.sent, _loop.send_space(id));
    if (n == 0) return false;  // the reactor offers our input again once the output drains
    _loop.send(id, std::as_bytes(std::span(p.bytes.data() + p.sent, n)));
    p.sent += n;
  }
  _pending.erase(id.slot);
  return true;
}

size_t MetricsHttp::on_data(reactor::ConnId id, std::span<const std::byte> data) {
  if (_pending.count(id.slot) != 0) {
    // A response larger than the output block: keep the request unconsumed
    // so the reactor calls again when there is room.
    if (!pump(id)) return 0;
    _loop.close(id, reactor::Reactor::Flush::yes);
    return data.size();
  }
  std::string_view req(reinterpret_cast<const char*>(data.data()), data.size());
  if (req.find("\r\n\r\n") == std::string_view::npos && req.find("\n\n") == std::string_view::npos) {
    if (data.size() > request_bytes_max) {
      respond(id, 400, "text/plain", "request too large\n");
      return data.size();
    }
    return 0;  // wait for the end of the headers
  }
  if (req.rfind("GET /metrics ", 0) == 0 || req.rfind("GET /metrics?", 0) == 0) {
    respond(id, 200, "text/plain; version=0.0.4; charset=utf-8", render_metrics(_control, _workers));
    if (_pending.count(id.slot) != 0) return 0;
  } else if (req.rfind("GET ", 0) == 0) {
    respond(id, 404, "text/plain", "try /metrics\n");
  } else {
    respond(id, 400, "text/plain", "bad request\n");
  }
  return data.size();
}

}  // namespace server
