"""Stand-ins for cloud services in tests: moto's server on loopback, with the parts moto leaves static (jobs that
run, endpoints that serve) emulated by running this project's own containers as local processes."""
