// Prometheus text exposition of the control file's counters, served by the
// master over plain HTTP (GET /metrics) through the project's reactor.
#pragma once

#include <string>
#include <unordered_map>
#include <vector>

#include "lottery/control.hpp"
#include "reactor/reactor.hpp"

namespace server {

// Renders every counter in the Prometheus text format (version 0.0.4).
std::string render_metrics(const lottery::control::Control& control, unsigned workers);

class MetricsHttp final : public reactor::Handler {
 public:
  MetricsHttp(reactor::Reactor& loop, const lottery::control::Control& control, unsigned workers, size_t max_conns);
  void on_open(reactor::ConnId id) override;
  size_t on_data(reactor::ConnId id, std::span<const std::byte> data) override;
  void on_close(reactor::ConnId id, reactor::CloseReason reason) override;

 private:
  void respond(reactor::ConnId id, int status, std::string_view content_type, const std::string& body);
  // Sends what fits of the connection's pending response; true when all is out.
  bool pump(reactor::ConnId id);

  struct Pending {
    std::string bytes;
    size_t sent = 0;
  };
  std::unordered_map<uint32_t, Pending> _pending;  // by slot; scrapes are rare and few

  reactor::Reactor& _loop;
  const lottery::control::Control& _control;
  unsigned _workers;
};

}  // namespace server
