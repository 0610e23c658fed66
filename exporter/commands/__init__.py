"""The exporter's CLI commands (click only; the work is done by the modules they call):
``ufad export``, ``ufad layers``, ``ufad demo``, ``ufad eval``, ``ufad bench``. Each is
loaded by ``ufad.runtime.cli`` only when it runs."""
