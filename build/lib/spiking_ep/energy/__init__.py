"""Energy of the analog and the spiking network on the same Φ (docs/energy.md).

counting   operations per sample, per layer, phase and kind, from the graph and the measured spikes
pricing    energy profiles (pJ per operation; shipped TOML files in profiles/ and yours, `register_profile`)
           and the comparison they give: energies, ratio, break-even spike rate
compare    `seqep compare`: measure a run (accuracy, spikes, training-step spikes) and price it
report     the report files (compare.json, compare.md) and the console table
plots      the report's figures
"""
