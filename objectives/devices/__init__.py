"""Target devices: profiles, the kernel view of a model, the latency model, calibration (micro-models,
chains, adaptive design), remote kits and their runner, power meters.

A profile (``studies/devices/NAME.json``) is what a search needs of a device: its thread count,
energy constants and, once calibrated, a latency model that predicts a candidate from its kernels.

Example:
    >>> from edgeslim.objectives.devices import load_device, kernel_type, Kernel
    >>> load_device("local").predicts_latency
    False
    >>> kernel_type(Kernel("conv", 8, 16, 16, 3, 1, 1, 8, 8, 8, 8))
    'conv_kxk@8'
"""

from edgeslim.objectives.devices._build import (BuiltProfile, calibrate_profile, foreign_device, kit_profile,
                                                read_kit_results, refit_profile, remeasure_line)
from edgeslim.objectives.devices._calibrate import (REFERENCE_KERNELS, CalibrationResult, SpeedTrack, calibrate,
                                                    measure_reference, network_record, reference_from)
from edgeslim.objectives.devices._kernels import (Edge, Kernel, boundary_class, extract_graph, extract_kernels, io_bytes,
                                                  kernel_type)
from edgeslim.objectives.devices._kits import (fit_energy, fit_measurements, reference_entries, refit, seal_kit,
                                               start_kit, write_kit)
from edgeslim.objectives.devices._micro import CHAINS, KERNEL_TYPES, MODES, chain_model, micro_model
from edgeslim.objectives.devices._layout import Layout, layout_of, probe_layout
from edgeslim.objectives.devices._model import BOUNDARY_CLASSES, LatencyModel
from edgeslim.objectives.devices._power import PowerCommandReader, RaplReader, find_rapl
from edgeslim.objectives.devices._profile import (DEVICES_DIR, DeviceProfile, EnergyConstants, known_devices,
                                                  load_device, nchwc_block_of, probe_nchwc_block, profile_id)
from edgeslim.objectives.devices._runner import (EXCURSION, KIT_VERSION, PROTOCOL, device_facts, reference_timings,
                                                 speed_ratio)
from edgeslim.spaces import ProfileError

__all__ = sorted([
    "BOUNDARY_CLASSES", "BuiltProfile", "CHAINS", "CalibrationResult", "DEVICES_DIR", "DeviceProfile", "EXCURSION",
    "Edge", "EnergyConstants", "KERNEL_TYPES", "KIT_VERSION", "Kernel", "LatencyModel", "Layout", "layout_of",
    "probe_layout", "MODES", "PROTOCOL",
    "PowerCommandReader", "ProfileError", "REFERENCE_KERNELS", "RaplReader", "SpeedTrack", "boundary_class",
    "calibrate", "calibrate_profile", "chain_model", "device_facts", "extract_graph", "extract_kernels", "find_rapl",
    "fit_energy", "fit_measurements", "foreign_device", "io_bytes", "kernel_type", "kit_profile", "known_devices",
    "load_device", "measure_reference", "micro_model", "network_record", "nchwc_block_of", "probe_nchwc_block", "profile_id",
    "read_kit_results", "reference_entries", "reference_from", "refit", "refit_profile", "remeasure_line",
    "seal_kit", "speed_ratio", "start_kit", "write_kit",
])
