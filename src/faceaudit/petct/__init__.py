"""The PET/CT re-identification pipeline (Bou Hanna et al., Scientific Data 2024):
volumes -> head surfaces -> renders -> PET->CT denoiser -> landmarks -> matching."""
