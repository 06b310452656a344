"""The digital-mask audit (Meeus et al., Nature Medicine 2023, on Yang et al. 2022):
frontal-face selection -> 3-D face -> grey mask render -> face-recognition attack."""
