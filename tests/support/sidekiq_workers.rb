# Worker classes named like GitLab's, for tests/test_sidekiq.py: each job
# appends one JSON line to $FIDO_SIDEKIQ_OUT saying exactly what the worker
# received (the argument's bytes in hex, its encoding, whether it is valid,
# and the bytes recovered by ISO-8859-1 when it is not binary-safe).
require "json"
require "sidekiq"

module FidoRecord
  def record(raw)
    latin1 = begin
      raw.encode("ISO-8859-1").unpack1("H*")
    rescue StandardError
      nil
    end
    line = {
      "class" => self.class.name,
      "jid" => jid,
      "nargs" => 1,
      "hex" => raw.b.unpack1("H*"),
      "encoding" => raw.encoding.name,
      "valid" => raw.valid_encoding?,
      "latin1_hex" => latin1,
    }
    File.open(ENV.fetch("FIDO_SIDEKIQ_OUT"), "a") do |f|
      f.flock(File::LOCK_EX)
      f.write(JSON.generate(line) + "\n")
    end
  end
end

class EmailReceiverWorker
  include Sidekiq::Worker
  include FidoRecord

  def perform(raw)
    record(raw)
  end
end

class ServiceDeskEmailReceiverWorker
  include Sidekiq::Worker
  include FidoRecord

  def perform(raw)
    record(raw)
  end
end
